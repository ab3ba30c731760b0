"""Tiny random causal LMs of every supported text family, built from configs in code.

Nothing is downloaded. Every model has hidden width 64, 2 blocks, 4 attention heads (2 KV heads
for the Llama-like families, so grouped-query attention is exercised), MLP width 128 and a
128-token vocabulary, in float32 and eval mode, with weights fixed by ``torch.manual_seed``. The
tests build on them, and ``benchmarks/family_presets.py`` runs every preset on each.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

#: Every supported text family with a tiny config (a Hugging Face ``model_type``; the first eight
#: have RMSNorms and gated MLPs).
FAMILIES = (
    "llama",
    "qwen2",
    "mistral",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "mixtral",
    "opt",
    "gpt2",
    "gpt_neox",
)
RMS_FAMILIES = FAMILIES[:8]

HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
VOCAB = 128
MAX_POSITIONS = 64
SEED = 0


def tiny_config(family: str, **overrides) -> transformers.PretrainedConfig:
    """A tiny config of ``family``; ``overrides`` go to the config class (e.g. post-LN OPT)."""
    llama_like = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
        "qwen3": transformers.Qwen3Config,
        "gemma2": transformers.Gemma2Config,
        "gemma3_text": transformers.Gemma3TextConfig,
        "phi3": transformers.Phi3Config,
        "mixtral": transformers.MixtralConfig,
    }
    if family in llama_like:
        kwargs = dict(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            intermediate_size=INTERMEDIATE,
            vocab_size=VOCAB,
            max_position_embeddings=MAX_POSITIONS,
        )
        if family in ("qwen3", "gemma2", "gemma3_text"):  # their head_dim is not hidden/heads
            hidden = overrides.get("hidden_size", HIDDEN)
            kwargs.update(head_dim=hidden // overrides.get("num_attention_heads", HEADS))
        if family.startswith("gemma"):  # one sliding-window layer (of 8 tokens), one global
            kwargs.update(
                query_pre_attn_scalar=16,
                sliding_window=8,
                layer_types=["sliding_attention", "full_attention"],
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=0,
            )
        if family == "mixtral":  # 4 experts of width 128, 2 per token
            kwargs.update(num_local_experts=4, num_experts_per_tok=2)
        if family == "phi3":
            kwargs.update(bos_token_id=0, eos_token_id=1, pad_token_id=0)
        return llama_like[family](**{**kwargs, **overrides})
    if family == "opt":
        # word_embed_proj_dim == hidden_size: no project_in / project_out.
        kwargs = dict(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            ffn_dim=INTERMEDIATE,
            vocab_size=VOCAB,
            word_embed_proj_dim=HIDDEN,
            max_position_embeddings=MAX_POSITIONS,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        return transformers.OPTConfig(**{**kwargs, **overrides})
    if family == "gpt2":
        kwargs = dict(
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_inner=INTERMEDIATE,
            vocab_size=VOCAB,
            n_positions=MAX_POSITIONS,
            bos_token_id=0,
            eos_token_id=0,
        )
        return transformers.GPT2Config(**{**kwargs, **overrides})
    if family == "gpt_neox":
        kwargs = dict(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            vocab_size=VOCAB,
            max_position_embeddings=MAX_POSITIONS,
            bos_token_id=0,
            eos_token_id=0,
        )
        return transformers.GPTNeoXConfig(**{**kwargs, **overrides})
    raise ValueError(f"no tiny config for family {family!r}")


def build_tiny_model(family: str, **overrides) -> nn.Module:
    config = tiny_config(family, **overrides)
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def build_tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary (``t0`` … ``t127``), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0")


#: Per-family widths at which every preset's group sizes (64, 128) divide the linears' inputs.
WIDE = {
    **{family: dict(hidden_size=128, intermediate_size=256) for family in RMS_FAMILIES},
    "opt": dict(hidden_size=128, ffn_dim=256, word_embed_proj_dim=128),
    "gpt2": dict(n_embd=128, n_inner=256),
    "gpt_neox": dict(hidden_size=128, intermediate_size=256),
}


@dataclass
class PresetTrial:
    """What one preset did to a tiny model of one family.

    ``status`` is ``"ok"`` (compressed; ``error`` is the relative logit error against the float
    model, or for a KV-cache recipe the relative change of the NLL read through its cache in
    chunks of 8 tokens; ``packed`` whether a packed save reloads with identical logits, None
    where the recipe quantizes no weight), ``"refused"`` (a
    :class:`~channelwise.errors.ChannelwiseError`, with its one-line ``reason``) or
    ``"failed"`` (anything else: a bug).
    """

    family: str
    preset: str
    status: str
    reason: str = ""
    error: float | None = None
    packed: bool | None = None


def preset_trial(family: str, preset: str, folder: Path, seed: int = 0) -> PresetTrial:
    """Compress a wide tiny ``family`` model with ``preset`` on random calibration ids, compare
    its logits with the float model's, and (for weight presets) pack, save under ``folder`` and
    reload."""
    from channelwise.compress import quantize, save_quantized
    from channelwise.deploy import pack_model
    from channelwise.deploy.kernel_call import use_kernels
    from channelwise.errors import ChannelwiseError
    from channelwise.evaluate.perplexity import next_token_nll
    from channelwise.kvcache.evaluate import chunked_window_nll
    from channelwise.methods.registry import quantizes_weights
    from channelwise.models import load_model
    from channelwise.recipe import load_recipe

    generator = torch.Generator().manual_seed(seed)
    calibration = torch.randint(0, VOCAB, (8, 32), generator=generator)
    ids = torch.randint(0, VOCAB, (2, 32), generator=generator)
    model = build_tiny_model(family, **WIDE[family])

    def logits(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(ids, use_cache=False).logits

    before = logits(model)
    trial = PresetTrial(family, preset, "ok")
    kernels = use_kernels(False)  # packed modules: the reference path, bit-identical
    try:
        recipe = load_recipe(preset)
        quantize(model, recipe, calibration, batch_size=4, progress=False)
        after = logits(model)
        trial.error = float((after - before).norm() / before.norm())
        if recipe.kv_cache is not None:  # the cache only acts when decoding reads it
            cached = chunked_window_nll(model, ids, chunk=8, progress=False)
            trial.error = float((cached.sum() / next_token_nll(before, ids).sum() - 1).abs())
        if any(quantizes_weights(step.method) for step in recipe.steps):
            pack_model(model)
            packed = logits(model)
            loaded, _ = load_model(save_quantized(model, build_tiny_tokenizer(), folder))
            trial.packed = torch.equal(packed, after) and torch.equal(logits(loaded), after)
    except ChannelwiseError as exc:
        trial.status, trial.reason = "refused", str(exc).splitlines()[0]
    except Exception as exc:  # noqa: BLE001 (reported as a failure, never hidden)
        trial.status, trial.reason = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        use_kernels(kernels)
    return trial
