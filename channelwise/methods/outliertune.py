"""OutlierTune: symmetrization and pre-executed dequantization for per-channel activations.

Wang et al., "OutlierTune: Efficient Channel-Wise Quantization for Large Language Models", arXiv
2406.18832. Per-channel activation scales are the natural cure for channel outliers, but a GEMM
cannot rescale inside its reduction dimension. OutlierTune (1) *symmetrizes* each input channel of
the QKV and MLP-in linears, ``X̃ = X − z`` with ``z_j`` the mean over calibration samples of each
sample's midpoint ``(max_t X_tj + min_t X_tj)/2`` (folded exactly: LayerNorm ``β ← β − z``,
consumers ``b ← b + W·z``); (2) takes a static per-channel range ``a_j = max |X̃_j|`` over all
calibration tokens and ``Δ_j = a_j / (2^{b−1} − 1)``; (3) *pre-executes the dequantization*:
``W′ = W·diag(Δ)`` for every consumer of that activation. At run time the integer activation is
``X_int = clamp(round(X̃ ⊘ Δ), −2^{b−1}, 2^{b−1} − 1)`` and ``y = X_int·W′ᵀ + b′``, with no
per-channel rescale inside the GEMM; ``W′`` is then quantized per output channel by the next step
(``rtn`` or ``gptq``).

Step (3) is exactly a channel scaling with ``s = Δ`` (:func:`fold_scales_into_norm`): the
norm then outputs ``X̃ ⊘ Δ``, which this step quantizes with a *static per-tensor quantizer of
scale 1* (integers, clamped) installed on q/k/v (or the fused QKV) and gate/up (fc1). The inputs
of o_proj and down_proj (fc2) get the recipe's activation quantizer (dynamic per token in the
presets), as in the paper's code. ::

    steps: [{method: outliertune}, {method: rtn}]

Arguments: ``shift`` (default true), ``shift_statistic`` (``sample_midpoint_mean``, the paper's;
or ``global_midpoint``, OS+'s ``(max + min)/2`` over all tokens).

Deviations and choices:

- The code has no clamp; the integer activation is clamped to ``[−2^{b−1}, 2^{b−1} − 1]`` here
  (values beyond the calibrated range saturate instead of overflowing).
- Llama family (RMSNorm, no bias): the paper's code does not shift (it clips each sample to 0.8 of
  its range instead). Here the shift is kept through a runtime hook on the norm and consumer
  biases (see :mod:`channelwise.transforms.shift`); ``shift: false`` disables it (no clipping).
- Calibration is the project protocol's (128 × 512 tokens of *Emma*), not 512 Pile-val samples;
  statistics are block by block, on inputs from previous blocks already compressed.
- A channel that is zero on every calibration token gets ``a_j = 1e-5`` (``Δ_j > 0``).
- q/k/v outputs (BMM inputs) are quantized only if the recipe's ``attention`` section asks.
- Post-LN models (OPT-350m) are refused.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from channelwise.adapters import ModelAdapter, Subset
from channelwise.engine import BlockContext
from channelwise.errors import RecipeError
from channelwise.methods.migration import ShiftMigration
from channelwise.methods.registry import register
from channelwise.observe import ChannelStats
from channelwise.quant import PerTensor, QParams, QuantSpec
from channelwise.quant.activation import InputQuantizer, install_input_quantizer
from channelwise.transforms.shift import (
    shift_norm_output,
)
from channelwise.transforms.smooth import MIN_SCALE, fold_scales_into_norm


def integer_quantizer(bits: int) -> InputQuantizer:
    """Static per-tensor quantizer, scale 1, zero 0: ``clamp(round(x), −2^{b−1}, 2^{b−1} − 1)``."""
    spec = QuantSpec(bits=bits, symmetric=True, granularity=PerTensor())
    return InputQuantizer(spec, QParams(torch.ones(1, 1), torch.zeros(1, 1)))


def step_sizes(absmax: Tensor, bits: int) -> Tensor:
    """``Δ_j = max(a_j, 1e-5) / (2^{b−1} − 1)``, ``(C,)`` float32."""
    if not torch.isfinite(absmax).all():
        raise RecipeError("outliertune: the activation range contains NaN/inf")
    return absmax.float().clamp(min=MIN_SCALE) / (2 ** (bits - 1) - 1)


class _MidpointMean:
    """Running mean over samples of ``(max_t X + min_t X)/2`` (or the global midpoint)."""

    def __init__(self, per_sample: bool) -> None:
        self.per_sample = per_sample
        self.total: Tensor | None = None
        self.count = 0
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None

    def update(self, x: Tensor) -> None:  # x: (batch, seq, C)
        x = x.float().reshape(-1, x.shape[-2], x.shape[-1])
        mid = (x.amax(dim=1) + x.amin(dim=1)) / 2
        self.total = mid.sum(0) if self.total is None else self.total + mid.sum(0)
        self.count += mid.shape[0]
        lo, hi = x.amin(dim=(0, 1)), x.amax(dim=(0, 1))
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def value(self) -> Tensor:
        return self.total / self.count if self.per_sample else (self.lo + self.hi) / 2


class OutlierTuneArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    shift: bool = True
    shift_statistic: Literal["sample_midpoint_mean", "global_midpoint"] = "sample_midpoint_mean"


@register
class OutlierTune(ShiftMigration):
    """Symmetrize, fold ``Δ`` into the weights, quantize ``X̃ ⊘ Δ`` to integers (static)."""

    name = "outliertune"
    needs_calibration = True
    quantizes_weights = False
    Args: ClassVar[type[BaseModel]] = OutlierTuneArgs

    def __init__(self, recipe, args) -> None:
        super().__init__(recipe, args)
        #: ``(block, subset) → (z, Δ)`` on the CPU (diagnostics, tests).
        self.folded: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}

    def check(self, model, adapter: ModelAdapter) -> None:
        super().check(model, adapter)
        where = f"recipe '{self.recipe.name}', step 'outliertune'"
        if self.recipe.activations is None:
            raise RecipeError(
                f"{where}: needs an 'activations' quantizer (its bits set Δ = a / (2^(b−1) − 1)), "
                "e.g. activations: {bits: 8, symmetric: true, granularity: token, dynamic: true}"
            )

    def _migrate(self, ctx: BlockContext, subset: Subset) -> None:
        bits = self.recipe.activations.bits
        transposed = ctx.adapter.transposed_weights
        norm = ctx.block.get_submodule(subset.prev)
        linears = [ctx.block.get_submodule(name) for name in subset.linears]
        z = torch.zeros(norm.weight.numel())
        if self.args.shift:
            midpoints = _MidpointMean(self.args.shift_statistic == "sample_midpoint_mean")
            ctx.observe((subset.linears[0],), lambda _name, x: midpoints.update(x))
            z = midpoints.value()
            shift_norm_output(norm, linears, z, transposed)
            self.state.record(ctx, subset)
        stats = ChannelStats()  # of X̃: the norm now outputs the shifted activation
        ctx.observe((subset.linears[0],), lambda _name, x: stats.update(x))
        delta = step_sizes(stats.absmax, bits)
        fold_scales_into_norm(norm, linears, delta, transposed)
        for module in linears:
            install_input_quantizer(module, integer_quantizer(bits))
        self.folded[(ctx.index, subset.name)] = (z.cpu(), delta.cpu())
