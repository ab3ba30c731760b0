"""Shared fixtures: tiny random causal LMs of every supported family, built from configs in code.

Nothing is downloaded. Every model has hidden width 64, 2 blocks, 4 attention heads (2 KV heads
for the Llama family, so grouped-query attention is exercised), MLP width 128 and a 128-token
vocabulary, in float32 and eval mode, with weights fixed by ``torch.manual_seed``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import transformers
from helpers import FAMILIES  # tests/helpers.py: shared by the test files
from torch import nn

HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
VOCAB = 128
MAX_POSITIONS = 64
SEED = 0

# The models are tiny: thread start-up and hand-off cost far more than the arithmetic (on a
# 2-core runner a forward takes ~150 ms with 2 threads and ~1 ms with one).
torch.set_num_threads(1)


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
        if family in ("qwen3", "gemma2", "gemma3_text"):  # their default head_dim is not 64/4
            kwargs.update(head_dim=HIDDEN // HEADS)
        if family.startswith("gemma"):  # one sliding-window layer (of 8 tokens), one global
            kwargs.update(
                query_pre_attn_scalar=HIDDEN // HEADS,
                sliding_window=8,
                layer_types=["sliding_attention", "full_attention"],
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=0,
            )
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


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    """Each supported family in turn (a test may parametrize ``family`` itself to narrow it)."""
    return request.param


@pytest.fixture
def tiny_model(family: str) -> nn.Module:
    """A fresh tiny random model of ``family``; tests may change it freely."""
    return build_tiny_model(family)


@pytest.fixture
def make_tiny_model() -> Callable[..., nn.Module]:
    """Factory ``(family, **config_overrides) -> model`` for variants such as post-LN OPT."""
    return build_tiny_model


@pytest.fixture
def opt_post_ln() -> nn.Module:
    """OPT with ``do_layer_norm_before=False`` (the OPT-350m layout)."""
    return build_tiny_model("opt", do_layer_norm_before=False)


@pytest.fixture
def token_ids() -> torch.Tensor:
    """Four sequences of 16 token ids, fixed."""
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def calibration_ids() -> torch.Tensor:
    """Six calibration sequences of 16 token ids, disjoint in seed from ``token_ids``."""
    return torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(2))


def build_tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary (``t0`` … ``t127``), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0")


@pytest.fixture
def tiny_tokenizer():
    """:func:`build_tiny_tokenizer`."""
    return build_tiny_tokenizer()
