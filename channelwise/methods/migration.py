"""Shared plumbing of the migration methods (OS+, OutlierTune): their base class (step order, the
norm subsets, the persisted shift state, the per-subset loop) and capturing a subset's inputs
(and the attention module's call) on calibration batches."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from channelwise.adapters import ModelAdapter, Subset
from channelwise.engine import BlockContext
from channelwise.errors import RecipeError, UnsupportedModelError
from channelwise.methods.registry import Method, check_transform_order
from channelwise.transforms.shift import ShiftState, enable_llama_biases, restore_shift_state


def norm_subsets(adapter: ModelAdapter, name: str) -> tuple[Subset, ...]:
    adapter.require_folding(name)
    subsets = tuple(s for s in adapter.subsets if s.prev_kind == "norm")
    if not subsets:
        raise UnsupportedModelError(f"{name}: {adapter.family} declares no norm → linear subset")
    return subsets


class ShiftMigration(Method):
    """Base of the methods that shift (and scale) a norm's output channels into its consumers.

    It checks the step order and picks the norm → linear subsets (a subclass may add more),
    enables Llama's linear biases when ``args.shift``, persists the RMSNorm output shifts
    (``state``) and runs ``_migrate(ctx, subset)`` on each subset of each block.
    """

    def __init__(self, recipe, args) -> None:
        super().__init__(recipe, args)
        self.subsets: tuple[Subset, ...] = ()
        self.state = ShiftState()

    def check(self, model, adapter: ModelAdapter) -> None:
        super().check(model, adapter)
        check_transform_order(self.recipe, self.name)
        self.subsets = norm_subsets(adapter, self.name)
        if self.args.shift:
            adapter.require_shifting(f"{self.name} with shift (args {{shift: false}} scales only)")

    def prepare_model(
        self, model: nn.Module, adapter, calibration: Tensor | None, *, progress: bool = False
    ) -> None:
        if self.args.shift:
            enable_llama_biases(model, adapter)

    def saved_state(self) -> dict[str, Tensor]:
        return self.state.saved()

    def restore(self, model: nn.Module, adapter, state: dict[str, Tensor]) -> None:
        self.state = restore_shift_state(model, state, adapter.transposed_weights)

    def apply(self, ctx: BlockContext) -> None:
        with torch.no_grad():
            for subset in self.subsets:
                self._migrate(ctx, subset)

    def _migrate(self, ctx: BlockContext, subset: Subset) -> None:
        raise NotImplementedError


def capture_subset_inputs(
    ctx: BlockContext, subset: Subset, n_samples: int | None
) -> tuple[list[Tensor], tuple | None]:
    """Inputs of ``subset`` on the first ``n_samples`` calibration sequences (all if ``None``),
    each ``(b, seq, C)``; and the attention module's ``(args, kwargs)`` on the first batch."""
    batches, seen = [], 0
    for x, kw in zip(ctx.inputs, ctx.kwargs, strict=True):
        if n_samples is not None and seen >= n_samples:
            break
        take = x.shape[0] if n_samples is None else min(x.shape[0], n_samples - seen)
        batches.append((x[:take], batch_slice(kw, x.shape[0], take)))
        seen += take
    captured = ctx.capture(subset.linears[0], "input", batches)
    call = ctx.capture(ctx.adapter.attention_module, "call", batches[:1])
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
