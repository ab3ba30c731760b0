"""DGQ: dual-grained A8W4 quantization with percentile-clipping smoothing.

Zhang, Fei, Wu, He, Lou, Zhou, "Dual Grained Quantization: Efficient Fine-Grained Quantization
for LLM", arXiv 2310.04836. Group-wise INT4 weights are stored so that they widen *exactly* to a
per-channel INT8 matrix (:mod:`channelwise.quant.dual_grained`): one INT8 GEMM with INT8
activations then serves fine-grained weights. Per block:

1. **Percentile-clipping smoothing** (no α). For each norm → linears input (and, in the Llama
   family, the input of down_proj, produced by up_proj), ``a_j`` is the running abs-max of the
   channel over all calibration tokens; with ``k = int(0.005·C + 1.5)`` and ``b`` the k-th
   largest ``a_j``, ``s_j = a_j / b`` where ``a_j > b``, else 1: the ``k − 1`` largest channels
   are brought down to ``b``. Folded exactly (:mod:`channelwise.transforms.smooth`): norm γ, β /= s
   and consumer columns ·= s; up_proj rows /= s and down_proj columns ·= s.
2. **Dual-grained weights**: one pass collects each subset's Gram matrix ``XᵀX / T`` (float64
   accumulation) and its per-sample abs-max; each linear gets the two-phase grid search of
   :func:`~channelwise.quant.dual_grained.dgq_quantize` and its weight is replaced by the
   de-quantized DGQ weight (fake-quant). The formats are kept in ``self.weights[(block, name)]``
   (CPU) for packing.
3. **Activations** (when the recipe's are static per tensor, symmetric): INT8 with
   ``amax = max_j min_n max_t |x_{n,t,j}|`` — per channel the least over calibration sequences
   ``n`` of the sequence's abs-max, then the largest channel: a range robust to rare spikes. The
   method installs these quantizers itself; dynamic activation recipes get the default ones.

Arguments: ``smooth`` (default true) turns step 1 off (the paper's ablation).

Cost: the phase-2 search evaluates 80 candidates per linear at ``O(out·in²)`` each (the Gram
form), independent of the calibration size; on SmolLM2-135M it dominates the calibration time on
a CPU (about 10 minutes with 8 samples on one thread of a busy 2-core machine).

Deviations from the paper and the official code (``ilur98/DGQ`` @141eef7):

- The search's output error uses the Gram matrix of *all* calibration tokens of the layer
  (exactly the token-averaged error of the paper, at a cost independent of the number of
  tokens); the official code searches on the inputs of the last calibration sample only.
- Phase 1 clips the *original* group weights at every ratio; the official code clamps the tensor
  in place, accumulating across candidates (harmless there only because its ratios decrease).
- Group ranges include zero (``[min(w, 0), max(w, 0)]``, as everywhere in channelwise), so the
  zero point is always a valid u4 code; ``S2`` is also clamped at 127 (never reached with these
  grids); ``s1`` is rounded to float32 before the codes are chosen, so the searched error is the
  error of the stored weight.
- Smoothing skips a subset whose ``b < 1e-4`` (as the official code) and is computed block by
  block on inputs that went through the already-quantized previous blocks; the official code
  does the same. Inputs of o_proj are not smoothed (the official code has it commented out).
- Statistics are per calibration *sequence* of the protocol (512 tokens of *Emma*), not 2048
  tokens of PTB/C4; all linears of a block are searched on inputs of the smoothed float block
  (one pass, as the official code), not sequentially.
- Quantization is simulated: weights are stored de-quantized; q/k/v BMM inputs are quantized
  only if the recipe's ``attention`` section asks (the paper uses 8-bit per tensor there).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from channelwise.adapters import ModelAdapter, Subset, linear_weight
from channelwise.engine import BlockContext
from channelwise.errors import ChannelwiseError, RecipeError
from channelwise.methods import registry
from channelwise.methods.registry import Method, register
from channelwise.quant import PerRow, QParams, QuantSpec, qparams_from_range
from channelwise.quant.activation import InputQuantizer, install_input_quantizer
from channelwise.quant.dual_grained import (
    DualGrainedWeight,
    dequantize,
    dgq_quantize,
    record_dual_grained,
)
from channelwise.quant.grid import record_grid
from channelwise.transforms.smooth import fold_scales_between_linears, fold_scales_into_norm

#: Fraction of channels clipped to the baseline: ``k = int(TOP_FRACTION·C + 1.5)``.
TOP_FRACTION = 0.005
INT8_ROWS = QuantSpec(bits=8, symmetric=True, granularity=PerRow())  # W_int8 with scale s1
#: Below this baseline a subset is left unsmoothed (the official code's guard).
MIN_BASELINE = 1e-4


def percentile_clipping_scales(a: Tensor, fraction: float = TOP_FRACTION) -> Tensor:
    """DGQ's smoothing factors ``(C,)`` from per-channel abs-maxima ``a`` ``(C,)``.

    ``k = int(fraction·C + 1.5)``; ``b`` = k-th largest ``a_j``; ``s_j = a_j / b`` if ``a_j > b``
    else 1 (all ones when ``b < MIN_BASELINE``).
    """
    if not isinstance(a, Tensor) or a.dim() != 1 or a.numel() == 0:
        raise RecipeError("percentile_clipping_scales: expected a non-empty 1-D abs-max tensor")
    a = a.detach().float()
    if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
        raise ChannelwiseError("DGQ smoothing: activation abs-maxima must be finite and >= 0")
    k = min(int(fraction * a.numel() + 1.5), a.numel())
    b = torch.topk(a, k).values[-1]
    if b < MIN_BASELINE:
        return torch.ones_like(a)
    return torch.where(a > b, a / b, torch.ones_like(a))


class DGQArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    smooth: bool = True


class _InputStats:
    """Streaming Gram ``XᵀX`` (float64) and per-sequence abs-max minimum of one subset's input.

    Inputs are ``(batch, seq_len, C)``, or ``(batch·seq_len, C)`` where a family flattens tokens
    (OPT's MLP); ``seq_len`` splits them back into calibration sequences.
    """

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len
        self.gram: Tensor | None = None
        self.tokens = 0
        self.seq_absmax_min: Tensor | None = None

    def update(self, x: Tensor) -> None:
        seqs = x.reshape(-1, self.seq_len, x.shape[-1])
        rows = seqs.reshape(-1, seqs.shape[-1]).float()
        gram = (rows.T @ rows).double()
        self.gram = gram if self.gram is None else self.gram + gram
        self.tokens += rows.shape[0]
        least = seqs.abs().amax(dim=1).amin(dim=0).float()
        prev = self.seq_absmax_min
        self.seq_absmax_min = least if prev is None else torch.minimum(prev, least)


@register
class DGQ(Method):
    """Percentile-clipping smoothing, dual-grained INT4/INT8 weights, robust static INT8 inputs."""

    name = "dgq"
    needs_calibration = True
    quantizes_weights = True
    Args: ClassVar[type[BaseModel]] = DGQArgs

    def __init__(self, recipe, args) -> None:
        super().__init__(recipe, args)
        self.group_size = 0
        self.smoothed: tuple[Subset, ...] = ()
        self.static_activations = False
        #: ``weights[(block_index, linear_name)]``: the dual-grained weight, on the CPU.
        self.weights: dict[tuple[int, str], DualGrainedWeight] = {}
        #: ``scales[(block_index, subset_name)]``: the smoothing factors folded, on the CPU.
        self.scales: dict[tuple[int, str], Tensor] = {}

    def check(self, model, adapter: ModelAdapter) -> None:
        super().check(model, adapter)
        where = f"recipe '{self.recipe.name}', step 'dgq'"
        w = self.recipe.weights
        if w.bits != 4 or w.symmetric or w.granularity != "group" or w.group_along != "input":
            raise RecipeError(
                f"{where}: the dual-grained format stores u4 asymmetric codes in groups along the "
                "input channels; use weights: {bits: 4, symmetric: false, granularity: group, "
                "group_size: 64}"
            )
        if w.range != "minmax":
            raise RecipeError(f"{where}: DGQ searches its own clipping; drop weights.range")
        self.group_size = w.group_size
        for block in adapter.block_list(model)[:1]:
            for name, module in adapter.block_linears(block).items():
                cols = linear_weight(module, adapter.transposed_weights).shape[1]
                if cols % self.group_size:
                    raise RecipeError(
                        f"{where}: group size {self.group_size} does not divide the {cols} input "
                        f"channels of {adapter.blocks}.*.{name}; choose a divisor of {cols}"
                    )
        self._check_activations(where)
        registry.check_transform_order(self.recipe, self.name)
        if self.args.smooth:
            adapter.require_folding("dgq smoothing")
            self.smoothed = tuple(
                s
                for s in adapter.subsets
                if s.prev_kind == "norm" or (s.role == "mlp_out" and s.prev_kind == "linear")
            )

    def _check_activations(self, where: str) -> None:
        acts = self.recipe.activations
        self.static_activations = acts is not None and not acts.dynamic
        if self.static_activations and (acts.granularity != "tensor" or not acts.symmetric):
            raise RecipeError(
                f"{where}: DGQ's static activation range is per tensor and symmetric; use "
                "activations: {bits: 8, symmetric: true, granularity: tensor} or dynamic: true"
            )

    def apply(self, ctx: BlockContext) -> None:
        if not self.group_size:
            raise RecipeError(
                "dgq: the method was not checked against the model; run it through "
                "channelwise.quantize (or compress.plan) first"
            )
        with torch.no_grad():
            if self.smoothed:
                self._smooth(ctx)
            self._quantize(ctx)

    def _smooth(self, ctx: BlockContext) -> None:
        block, transposed = ctx.block, ctx.adapter.transposed_weights
        observed = {subset.linears[0]: subset.name for subset in self.smoothed}
        absmax: dict[str, Tensor] = {}

        def update(name: str, x: Tensor) -> None:
            m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            key = observed[name]
            absmax[key] = m if key not in absmax else torch.maximum(absmax[key], m)

        ctx.observe(tuple(observed), update)
        for subset in self.smoothed:
            if subset.name not in absmax:
                raise ChannelwiseError(
                    f"dgq: block {ctx.index} never ran '{subset.linears[0]}' on the calibration "
                    "data; cannot collect its statistics"
                )
            s = percentile_clipping_scales(absmax[subset.name])
            linears = [block.get_submodule(name) for name in subset.linears]
            prev = block.get_submodule(subset.prev)
            if subset.prev_kind == "norm":
                fold_scales_into_norm(prev, linears, s, transposed)
            else:
                fold_scales_between_linears(prev, linears, s, transposed)
            self.scales[(ctx.index, subset.name)] = s.cpu()

    def _quantize(self, ctx: BlockContext) -> None:
        observed = {subset.linears[0]: subset for subset in ctx.adapter.subsets}
        seq_len = ctx.inputs[0].shape[-2]
        stats = {subset.name: _InputStats(seq_len) for subset in ctx.adapter.subsets}
        ctx.observe(tuple(observed), lambda name, x: stats[observed[name].name].update(x))
        act_spec = self.recipe.activations.spec("activation") if self.static_activations else None
        for subset in ctx.adapter.subsets:
            st = stats[subset.name]
            if st.gram is None:
                raise ChannelwiseError(
                    f"dgq: block {ctx.index} never ran '{subset.linears[0]}' on the calibration "
                    "data; the model's adapter does not match its forward"
                )
            H = (st.gram / st.tokens).float()
            for name in subset.linears:
                module = ctx.block.get_submodule(name)
                weight = linear_weight(module, ctx.adapter.transposed_weights)
                label = f"{ctx.adapter.block_path(ctx.index)}.{name}"
                dgw = dgq_quantize(weight, H, self.group_size, name=label)
                weight.copy_(dequantize(dgw).to(weight.dtype))
                # The A8W4 GEMM runs on W_int8 = S2·(q − z) with per-row scale s1: pack that.
                s1 = dgw.s1.float()[:, None]
                record_grid(module, INT8_ROWS, QParams(s1, torch.zeros_like(s1)))
                record_dual_grained(module, dgw)  # packing stores the 4-bit codes
                self.weights[(ctx.index, name)] = dgw.to("cpu")
                if act_spec is not None:
                    amax = st.seq_absmax_min.max().reshape(1, 1)
                    qparams = qparams_from_range(-amax, amax, act_spec)
                    install_input_quantizer(module, InputQuantizer(act_spec, qparams))


__all__ = [
    "DGQ",
    "MIN_BASELINE",
    "TOP_FRACTION",
    "percentile_clipping_scales",
]
