"""AWQ: activation-aware scaling and clipping of the weights before low-bit weight quantization.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", MLSys 2024, arXiv 2306.00978.

A few input channels carry much larger activations than the rest; their weight columns matter
most, and scaling them up before quantization (``W·diag(s)``, input divided by ``s``) lowers their
relative rounding error. Per block and per subset whose input comes from a foldable op (a norm, a
linear, or v_proj under grouped-query attention), with ``x̄_j = mean|X_j|`` over the calibration
tokens of the subset's input:

1. scale search: for ``α ∈ {0, 1/n_grid, …, (n_grid−1)/n_grid}``, ``s = x̄^α`` (clamped ≥ 1e-4)
   divided by ``√(max s · min s)``; the loss is the MSE between the float output of the module
   the subset feeds and its output with ``Q(W·diag(s))·diag(s)⁻¹`` in place of ``W``, where ``Q``
   is the recipe's weight quantizer. Modules: the attention module for QKV, the MLP for gate/up
   (whatever module holds all of the subset's linears), the linear itself for o_proj and
   down_proj (and for linears that sit directly in the block, e.g. OPT's fc1). The best ``s``
   (``α = 0`` gives ``s = 1``, so plain RTN is always a candidate) is folded exactly into the
   producing op (:mod:`channelwise.transforms.subset_scales`).
2. clip search: for every linear except the query/key projections (whose output error is not what
   attention depends on, as in the official code), per output row and weight-quantizer group,
   weights are clamped to ``±r·max|w|`` for ``r ∈ {1, 1 − 1/clip_grid, …}`` down to
   ``1 − max_shrink`` (exclusive; 1 … 0.55 by default), and the ``r`` with the least MSE of the
   group's partial output ``x_g·w_gᵀ`` (against the unclipped float weights) is applied.

This step rewrites weights (scales exactly, clipping not) and quantizes nothing: put a quantizing
step after it — ``steps: [{method: awq}, {method: rtn}]`` is AWQ as published (the official code
also searches, then quantizes with RTN); ``[{method: awq}, {method: gptq}]`` composes AWQ with
GPTQ. Both searches use the recipe's ``weights`` quantizer, so a recipe must have one.

Arguments: ``n_grid`` (20), ``search_samples`` (8 calibration sequences, see below),
``clip`` (true), ``clip_grid`` (20), ``max_shrink`` (0.5) — the official defaults except
``search_samples``.

Deviations from the paper and the official code (``mit-han-lab/llm-awq``):

- Statistics ``mean|x|`` use every calibration token of the block's input, but the losses of both
  searches use only the first ``search_samples`` sequences (rounded up to whole engine batches;
  8 × 512 = 4,096 tokens on the benchmark), to keep a 30-block model to minutes on a CPU. The
  official code uses all 128 × 512 tokens for the scale loss and 512 sampled tokens for clipping.
- The clip loss is evaluated in closed form, ``Σ_g d_gᵀ (X_gᵀX_g / n) d_g`` with ``d_g`` the
  group's weight error, on all search tokens instead of 512 sampled ones: the same objective.
- Block inputs come from the previous blocks *after* they were scaled, clipped and quantized by
  the whole recipe (the engine's order); the official code feeds each block the outputs of the
  float (scaled, unclipped, unquantized) previous block.
- Under grouped-query attention, v_proj → o_proj is scaled with one factor per v channel shared
  by the query heads of its group (``x̄`` reduced by max over the group); the official code skips
  this pair when v_proj and o_proj differ in shape.
- OPT's fc1 → fc2 (through ReLU, exact for ``s > 0``) is not scaled: the OPT adapter declares no
  foldable producer for fc2. GPT-2 and GPT-NeoX scale the QKV and MLP inputs only (GELU).
- Calibration is the project protocol's (*Emma*), not Pile-val. Folding into norms is refused on
  post-LN models (OPT-350m), where it would not be exact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from channelwise.adapters import ModelAdapter, Subset, linear_weight
from channelwise.engine import BlockContext
from channelwise.errors import RecipeError
from channelwise.methods.registry import Method, check_search_transform, register
from channelwise.quant import QuantSpec, fake_quantize
from channelwise.transforms.subset_scales import (
    fold_subset,
    foldable_subsets,
    head_geometry,
    to_fold_channels,
    to_input_channels,
)

log = logging.getLogger(__name__)

#: Floor of ``x̄^α`` before normalization (as the official code).
MIN_SCALE = 1e-4


class AWQArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    n_grid: int = Field(default=20, ge=1)
    search_samples: int = Field(default=8, ge=1)
    clip: bool = True
    clip_grid: int = Field(default=20, ge=1)
    max_shrink: float = Field(default=0.5, gt=0.0, lt=1.0)


def awq_scales(mean_abs: Tensor, alpha: float) -> Tensor:
    """``s = x̄^α / √(max · min)`` per channel, ``(C,)`` float32 (``x̄^α`` clamped ≥ 1e-4)."""
    s = mean_abs.float().pow(alpha).clamp(min=MIN_SCALE)
    return s / (s.max() * s.min()).sqrt()


def scaled_fake_quantize(weight: Tensor, s: Tensor, spec: QuantSpec) -> Tensor:
    """``Q(W·diag(s))·diag(s)⁻¹`` for ``W`` ``(out, in)``, ``s`` ``(in,)``; float32."""
    s = s.to(weight.device)
    return fake_quantize(weight.float() * s, spec) / s


def search_scales(
    mean_abs: Tensor, loss_of: Callable[[Tensor], float], n_grid: int
) -> tuple[float, Tensor, list[float]]:
    """Grid-search ``α``: returns the best ``α``, its ``s`` and every loss (``α = i / n_grid``)."""
    losses = [loss_of(awq_scales(mean_abs, i / n_grid)) for i in range(n_grid)]
    best = min(range(n_grid), key=lambda i: losses[i])  # ties: the smallest α
    return best / n_grid, awq_scales(mean_abs, best / n_grid), losses


def group_gram(x: Tensor, group: int) -> Tensor:
    """Per-group second moments ``X_gᵀX_g / n`` of inputs ``x`` ``(..., in)``: ``(G, g, g)``."""
    x = x.reshape(-1, x.shape[-1]).float()
    xg = x.view(x.shape[0], -1, group)
    return torch.einsum("ngi,ngj->gij", xg, xg) / x.shape[0]


def group_output_error(delta: Tensor, gram: Tensor) -> Tensor:
    """Mean squared partial-output error per row and group, ``(out, G)``.

    ``delta`` is a weight error ``(out, in)``; the result is ``mean_t (x_{t,g}·δ_{o,g})²``.
    """
    d = delta.float().view(delta.shape[0], gram.shape[0], gram.shape[1])
    return (torch.einsum("ogi,gij->ogj", d, gram) * d).sum(-1)


def clip_search(
    weight: Tensor, gram: Tensor, spec: QuantSpec, clip_grid: int = 20, max_shrink: float = 0.5
) -> Tensor:
    """Per row and group, the clip bound ``r·max|w|`` with least quantized output error.

    ``weight`` ``(out, in)``, ``gram`` ``(G, g, g)`` from :func:`group_gram`; returns ``(out, G,
    1)``. ``r`` runs over ``1 − i/clip_grid`` for ``i < max_shrink·clip_grid``; ``r = 1``
    (no clipping) is always a candidate, so the measured error never grows.
    """
    out, groups, group = weight.shape[0], gram.shape[0], gram.shape[1]
    w = weight.float().view(out, groups, group)
    amax = w.abs().amax(dim=-1, keepdim=True)
    best_bound, best_err = amax.clone(), None
    for i in range(max(1, int(max_shrink * clip_grid))):
        bound = amax * (1 - i / clip_grid)
        quantized = fake_quantize(torch.clamp(w, -bound, bound).view(out, -1), spec)
        err = group_output_error(w.view(out, -1) - quantized, gram)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_bound = torch.where(better[..., None], bound, best_bound)
    return best_bound


@register
class AWQ(Method):
    """Activation-aware scale search folded into the producers, then clip search; no rounding."""

    name = "awq"
    needs_calibration = True
    quantizes_weights = False
    offloadable = True
    Args: ClassVar[type[BaseModel]] = AWQArgs

    def __init__(self, recipe, args) -> None:
        super().__init__(recipe, args)
        self.subsets: tuple[Subset, ...] = ()
        self.n_rep, self.head_dim = 1, 1
        #: ``alphas[(block_index, subset_name)]``: the α chosen, and the loss of every α tried.
        self.alphas: dict[tuple[int, str], float] = {}
        self.losses: dict[tuple[int, str], list[float]] = {}

    def check(self, model, adapter: ModelAdapter) -> None:
        super().check(model, adapter)
        check_search_transform(self.recipe, self.name)
        self.subsets = foldable_subsets(adapter)
        if not self.subsets:
            raise RecipeError(f"awq: {adapter.family} declares no subset with a foldable producer")
        if any(subset.prev_kind == "norm" for subset in self.subsets):
            adapter.require_folding("awq")
        spec = self.recipe.weights.spec("weight")
        if self.args.clip:
            for name, module in adapter.block_linears(adapter.block_list(model)[0]).items():
                rows, cols = linear_weight(module, adapter.transposed_weights).shape
                if spec.granularity.block_shape(rows, cols)[0] != 1:
                    raise RecipeError(
                        f"recipe '{self.recipe.name}', step 'awq': the clip search needs weight "
                        f"scales per output channel or per group along the input, not "
                        f"{spec.granularity} ({name}); use such weights or args {{clip: false}}"
                    )
        if any(subset.prev_kind == "grouped_heads" for subset in self.subsets):
            self.n_rep, self.head_dim = head_geometry(model.config)

    # --- work on one block -------------------------------------------------------------------

    def apply(self, ctx: BlockContext) -> None:
        if not self.subsets:
            raise RecipeError("awq: the method was not checked against the model; use quantize")
        spec = self.recipe.weights.spec("weight")
        inputs, calls, mean_abs = self._observe(ctx)
        for subset in self.subsets:
            s = self._search_subset(ctx, subset, spec, inputs, calls, mean_abs[subset.name])
            s_in = to_input_channels(subset, s, self.n_rep, self.head_dim)
            inputs[subset.name] = [x / s_in.to(x) for x in inputs[subset.name]]
        if self.args.clip:
            self._clip(ctx, spec, inputs)

    def _observe(self, ctx: BlockContext):
        """One pass over all batches: ``mean|x|`` per subset; inputs of the search batches."""
        n_batches = _batches_for(ctx.inputs, self.args.search_samples)
        firsts = {subset.linears[0]: subset for subset in ctx.adapter.subsets}
        inputs: dict[str, list[Tensor]] = {s.name: [] for s in ctx.adapter.subsets}
        sums: dict[str, Tensor] = {}
        counts = dict.fromkeys(inputs, 0)

        def update(name: str, x: Tensor) -> None:
            subset = firsts[name]
            rows = x.reshape(-1, x.shape[-1]).float()
            total = rows.abs().sum(0, dtype=torch.float64)
            sums[subset.name] = sums[subset.name] + total if subset.name in sums else total
            counts[subset.name] += rows.shape[0]
            if len(inputs[subset.name]) < n_batches:
                inputs[subset.name].append(x)

        calls: dict[str, list[tuple[tuple, dict]]] = {}
        handles = []
        for subset in self.subsets:
            parent = _feeding_module(subset)
            if parent is not None and parent not in calls:
                calls[parent] = []

                def hook(_module, args, kwargs, parent=parent):
                    if len(calls[parent]) < n_batches:
                        calls[parent].append((args, dict(kwargs)))

                module = ctx.block.get_submodule(parent)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            ctx.observe(tuple(firsts), update)
        finally:
            for handle in handles:
                handle.remove()
        mean_abs = {name: (sums[name] / counts[name]).float() for name in sums}
        return inputs, calls, mean_abs

    def _search_subset(self, ctx, subset, spec, inputs, calls, mean_abs) -> Tensor:
        """Grid-search α for one subset, fold the best ``s``; returns it per fold channel."""
        transposed = ctx.adapter.transposed_weights
        weights = [linear_weight(ctx.block.get_submodule(n), transposed) for n in subset.linears]
        originals = [w.clone() for w in weights]
        parent = _feeding_module(subset)
        if parent is not None:
            module = ctx.block.get_submodule(parent)
            reference = [_first(module(*a, **kw)) for a, kw in calls[parent]]

        def loss_of(s_fold: Tensor) -> float:
            s_in = to_input_channels(subset, s_fold, self.n_rep, self.head_dim)
            quantized = [scaled_fake_quantize(w, s_in, spec) for w in originals]
            if parent is None:  # the linears' own outputs: ‖x (Ŵ − W)ᵀ‖² / (tokens · out)
                return _linear_output_mse(inputs[subset.name], quantized, originals)
            try:
                for w, q in zip(weights, quantized, strict=True):
                    w.copy_(q.to(w.dtype))
                total, count = 0.0, 0
                for (a, kw), ref in zip(calls[parent], reference, strict=True):
                    out = _first(module(*a, **kw))
                    total += (out.float() - ref.float()).square().sum().item()
                    count += ref.numel()
                return total / count
            finally:
                for w, original in zip(weights, originals, strict=True):
                    w.copy_(original)

        x_bar = to_fold_channels(subset, mean_abs, self.n_rep, self.head_dim)
        alpha, s, losses = search_scales(x_bar, loss_of, self.args.n_grid)
        fold_subset(ctx.block, subset, s, transposed, self.n_rep, self.head_dim)
        self.alphas[(ctx.index, subset.name)] = alpha
        self.losses[(ctx.index, subset.name)] = losses
        log.debug(
            "awq block %d %s: alpha %.2f, loss %.4g (alpha 0: %.4g)",
            ctx.index, subset.name, alpha, min(losses), losses[0],
        )  # fmt: skip
        return s

    def _clip(self, ctx: BlockContext, spec: QuantSpec, inputs: dict[str, list[Tensor]]) -> None:
        skip = {name for key, name in ctx.adapter.attention.items() if key in ("q", "k", "qkv")}
        transposed = ctx.adapter.transposed_weights
        for subset in ctx.adapter.subsets:
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[subset.name]])
            for name in subset.linears:
                if name in skip:
                    continue
                weight = linear_weight(ctx.block.get_submodule(name), transposed)
                group = spec.granularity.block_shape(*weight.shape)[1]
                bound = clip_search(
                    weight, group_gram(x, group), spec, self.args.clip_grid, self.args.max_shrink
                )
                w = weight.float().view(bound.shape[0], bound.shape[1], -1)
                weight.copy_(torch.clamp(w, -bound, bound).view_as(weight).to(weight.dtype))


def _feeding_module(subset: Subset) -> str | None:
    """The module whose output a norm subset's loss compares: the linears' common parent.

    ``None`` (compare the linears' own outputs) for linear-fed subsets and for linears that sit
    directly in the block.
    """
    if subset.prev_kind != "norm":
        return None
    parents = {name.rpartition(".")[0] for name in subset.linears}
    parent = parents.pop() if len(parents) == 1 else ""
    return parent or None


def _linear_output_mse(xs: list[Tensor], quantized: list[Tensor], originals: list[Tensor]) -> float:
    total, count = 0.0, 0
    for q, w in zip(quantized, originals, strict=True):
        delta = (q - w.float()).t()
        for x in xs:
            rows = x.reshape(-1, x.shape[-1]).float()
            total += (rows @ delta).square().sum().item()
            count += rows.shape[0] * delta.shape[1]
    return total / count


def _first(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _batches_for(inputs: list[Tensor], samples: int) -> int:
    """How many leading engine batches hold at least ``samples`` sequences."""
    seen = 0
    for index, x in enumerate(inputs):
        seen += x.shape[0]
        if seen >= samples:
            return index + 1
    return len(inputs)
