"""Helpers shared by the test files (import them: ``from helpers import logits``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn

from channelwise.tiny import FAMILIES as TINY_FAMILIES
from channelwise.tiny import RMS_FAMILIES  # noqa: F401 (re-exported)

#: The families the shared ``family`` fixture runs: every tiny family but Mixtral, whose
#: experts, router and presets test_families covers on their own (keeping the suite's time).
FAMILIES = tuple(family for family in TINY_FAMILIES if family != "mixtral")


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``(batch, seq, vocab)`` logits of ``model`` on token ids ``(batch, seq)``, no cache."""
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def relative_error(after: torch.Tensor, before: torch.Tensor) -> float:
    """``‖after − before‖ / ‖before‖`` (Frobenius), e.g. of logits before/after a transform."""
    return ((after - before).norm() / before.norm()).item()


def save_and_reload(model: nn.Module, tokenizer, folder: Path) -> nn.Module:
    """Save the quantized ``model`` to ``folder`` and load it back (CPU), as a user would."""
    from channelwise.compress import save_quantized
    from channelwise.models import load_model

    loaded, _ = load_model(save_quantized(model, tokenizer, folder), device="cpu")
    return loaded


def inject_outlier_channel(model: nn.Module, channel: int = 5, factor: float = 50.0) -> None:
    """Scale one channel of every norm feeding linears: an activation outlier, as in real LLMs."""
    from channelwise.adapters import adapter_for

    adapter = adapter_for(model)
    with torch.no_grad():
        for block in adapter.block_list(model):
            for subset in adapter.subsets:
                if subset.prev_kind == "norm":
                    block.get_submodule(subset.prev).weight[channel] *= factor


def greedy_generate(
    model: nn.Module, ids: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ``steps`` new tokens after ``ids``: the sequences and the stacked step scores."""
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    return out.sequences, torch.stack(out.scores)


def count_calls(monkeypatch, owner, name: str) -> list[int]:
    """Wrap ``owner.<name>(x, ...)`` so each call records its token count ``x.numel() //
    x.shape[-1]``; returns the (growing) list."""
    calls: list[int] = []
    real = getattr(owner, name)

    def counted(x, *args):
        calls.append(x.numel() // x.shape[-1])
        return real(x, *args)

    monkeypatch.setattr(owner, name, counted)
    return calls


#: Static per-tensor asymmetric 4-bit activations, per-channel 4-bit weights, and 4-bit q/k/v:
#: the W4A4 fields the ViT method tests build recipes from.
STATIC4 = {"bits": 4, "symmetric": False, "granularity": "tensor", "dynamic": False, "range": "mse"}
WEIGHTS4 = {"bits": 4, "symmetric": False, "granularity": "channel", "range": "mse"}
ATTENTION4 = {"q": STATIC4, "k": STATIC4, "v": STATIC4}


def tiny_dinov2_config(**overrides) -> transformers.Dinov2Config:
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        patch_size=4,
        image_size=16,
        layerscale_value=0.5,
    )
    return transformers.Dinov2Config(**{**kwargs, **overrides})


def tiny_swin_config(**overrides) -> transformers.SwinConfig:
    """Two stages of two blocks (the second of each in shifted windows), 8×8 then 4×4 tokens."""
    kwargs = dict(embed_dim=16, depths=[2, 2], num_heads=[2, 4], image_size=16, patch_size=2)
    kwargs |= dict(window_size=2, mlp_ratio=2.0)
    return transformers.SwinConfig(**{**kwargs, **overrides})


def tiny_vision_model(family: str) -> nn.Module:
    """A tiny random backbone of a vision ``family`` (dinov2, vit, deit, swin), 16 px images."""
    torch.manual_seed(0)
    if family == "dinov2":
        return transformers.Dinov2Model(tiny_dinov2_config()).eval()
    if family == "swin":
        model = transformers.SwinModel(tiny_swin_config(), add_pooling_layer=False).eval()
        with torch.no_grad():  # a trained Swin's relative-position biases are not zero
            for name, param in model.named_parameters():
                if name.endswith("relative_position_bias_table"):
                    param.normal_(0.0, 0.5)
        return model
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    common |= dict(intermediate_size=64, image_size=16, patch_size=4)
    if family == "vit":
        return transformers.ViTModel(transformers.ViTConfig(**common)).eval()
    return transformers.DeiTModel(transformers.DeiTConfig(**common)).eval()


def write_image_folder(root: Path, classes: int = 3, per_class: int = 8, seed: int = 0) -> Path:
    """Class ``c``'s images are noise around grey level ``60·c + 40``: separable by brightness."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            level = 60 * c + 40
            pixels = np.clip(rng.normal(level, 10, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root
