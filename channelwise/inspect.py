"""What a recipe does to the activations: per-channel statistics before and after its transforms.

``inspect_channels`` observes the input of every subset of every block on calibration tokens, on
the model as loaded and, given a recipe, on a fresh copy compressed with it. The recipe runs as
written (methods such as OutlierTune need its activation format), without attention
quantizers; every input quantizer is then removed before observing, so the "after" statistics
are exactly what those quantizers see: the inputs after smoothing, shifting or rotation, with
the weights already quantized.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from channelwise.compress import quantize
from channelwise.models import load_model
from channelwise.observe import ModelChannelStats, collect_channel_stats
from channelwise.protocol import Protocol
from channelwise.quant.activation import remove_input_quantizer
from channelwise.recipe import Recipe, load_recipe


@dataclass
class ChannelInspection:
    """``before``: the model as loaded; ``after``: compressed by ``recipe`` (None without one)."""

    before: ModelChannelStats
    after: ModelChannelStats | None = None
    recipe: Recipe | None = None


def without_attention_quantizers(recipe: Recipe) -> Recipe:
    """``recipe`` with its attention (q/k/v/probs) quantizers dropped; everything else kept."""
    return recipe.model_copy(update={"attention": None})


def inspect_channels(
    model: str | Path | None = None,
    protocol: Protocol | None = None,
    recipe: str | Path | Recipe | None = None,
    *,
    device: str | None = None,
    progress: bool = True,
) -> ChannelInspection:
    """Per-channel input statistics of every block subset, before and (given ``recipe``) after.

    ``model`` is anything :func:`~channelwise.models.load_model` accepts; ``protocol`` gives the
    calibration tokens (default: the benchmark protocol). The recipe is checked before any work.
    """
    protocol = protocol or Protocol()
    recipe = load_recipe(recipe) if recipe is not None else None
    fp_model, tokenizer = load_model(model, device=device)
    tokens = protocol.calibration_tokens(tokenizer)
    result = ChannelInspection(before=collect_channel_stats(fp_model, tokens, progress=progress))
    if recipe is not None:  # observing changed nothing: compress the same copy
        result.after = channel_stats_after(fp_model, recipe, tokens, progress=progress)
        result.recipe = recipe
    return result


def channel_stats_after(
    model: nn.Module, recipe: Recipe, tokens: torch.Tensor, progress: bool = True
) -> ModelChannelStats:
    """Compress ``model`` in place with ``recipe`` (no attention quantizers), then observe its
    linears' inputs with every input quantizer removed."""
    quantize(model, without_attention_quantizers(recipe), tokens, progress=progress)
    for module in model.modules():
        remove_input_quantizer(module)
    return collect_channel_stats(model, tokens, progress=progress)
