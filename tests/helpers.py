"""Helpers shared by the test files (import them: ``from helpers import logits``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

FAMILIES = ("llama", "qwen2", "mistral", "opt", "gpt2", "gpt_neox")


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
