"""Shared plumbing of the migration methods (OS+, OutlierTune): step order, the norm subsets,
and capturing a subset's inputs (and the attention module's call) on calibration batches."""

from __future__ import annotations

import torch
from torch import Tensor

from channelwise.adapters import ModelAdapter, Subset
from channelwise.engine import BlockContext
from channelwise.errors import RecipeError, UnsupportedModelError
from channelwise.methods import registry


class StopForward(Exception):
    """Raised by a hook to end a forward pass once what it needs was seen."""


def check_transform_order(recipe, name: str) -> None:
    """Refuse a transform step placed after a step that quantizes the weights."""
    quantized_by = None
    for step in recipe.steps:
        cls = registry._METHODS.get(step.method)
        if step.method == name and quantized_by is not None:
            raise RecipeError(
                f"recipe '{recipe.name}': step '{name}' must come before weight quantization, but "
                f"'{quantized_by}' quantizes the weights first; put {name} first"
            )
        if cls is not None and cls.quantizes_weights:
            quantized_by = step.method


def norm_subsets(adapter: ModelAdapter, name: str) -> tuple[Subset, ...]:
    adapter.require_folding(name)
    subsets = tuple(s for s in adapter.subsets if s.prev_kind == "norm")
    if not subsets:
        raise UnsupportedModelError(f"{name}: {adapter.family} declares no norm → linear subset")
    return subsets


def capture_subset_inputs(
    ctx: BlockContext, subset: Subset, n_samples: int | None
) -> tuple[list[Tensor], tuple | None]:
    """Inputs of ``subset`` on the first ``n_samples`` calibration sequences (all if ``None``),
    each ``(b, seq, C)``; and the attention module's ``(args, kwargs)`` on the first batch."""
    first = ctx.block.get_submodule(subset.linears[0])
    attention = ctx.block.get_submodule(ctx.adapter.attention_module)
    captured: list[Tensor] = []
    call: list[tuple] = []

    def grab(_m, args):
        captured.append(args[0].detach())
        raise StopForward

    def grab_call(_m, args, kwargs):
        if not call:
            call.append((args, dict(kwargs)))

    handles = [
        first.register_forward_pre_hook(grab),
        attention.register_forward_pre_hook(grab_call, with_kwargs=True),
    ]
    seen = 0
    try:
        with torch.no_grad():
            for x, kw in zip(ctx.inputs, ctx.kwargs, strict=True):
                if n_samples is not None and seen >= n_samples:
                    break
                take = x.shape[0] if n_samples is None else min(x.shape[0], n_samples - seen)
                try:
                    ctx.block(x[:take].to(ctx.device), **batch_slice(kw, x.shape[0], take))
                except StopForward:
                    pass
                seen += take
    finally:
        for handle in handles:
            handle.remove()
    if not captured:
        raise RecipeError(f"block {ctx.index} never ran '{subset.linears[0]}' on calibration data")
    return captured, (call[0] if call else None)


def batch_slice(value, batch: int, take: int):
    """Slice every tensor (≥ 2-D) whose first dimension is the batch to its first ``take`` rows."""
    if isinstance(value, Tensor):
        return value[:take] if value.dim() >= 2 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(batch_slice(v, batch, take) for v in value)
    if isinstance(value, dict):
        return {k: batch_slice(v, batch, take) for k, v in value.items()}
    return value
