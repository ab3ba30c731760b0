"""The grid a quantized weight lies on, recorded where the weight is written.

A method that rounds a linear's weight records the spec and the per-block scale and zero point it
used (``record_grid``). Packing then recovers the integer codes exactly, ``q = round(W/s) + z``,
because the fake-quantized ``W`` is ``(q − z)·s`` computed in float32, and ``(q − z)·s`` computed
again from the codes gives back ``W`` bit for bit. Scales cannot be re-derived from the rounded
weight instead: GPTQ computes them from the weight before (or during) its error updates.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from channelwise.quant.core import QParams, QuantSpec, compute_qparams, fake_quantize

GRID_ATTR = "_channelwise_weight_grid"


@dataclass(frozen=True)
class WeightGrid:
    """``spec`` and ``qparams`` ``(R, C)`` (blocks of ``spec.granularity`` on ``(out, in)``)."""

    spec: QuantSpec
    qparams: QParams


def record_grid(module: nn.Module, spec: QuantSpec, qparams: QParams) -> None:
    """Remember that ``module``'s ``(out, in)`` weight now lies on ``spec``'s grid ``qparams``."""
    kept = QParams(
        qparams.scale.detach().float().clone(), qparams.zero_point.detach().float().clone()
    )
    setattr(module, GRID_ATTR, WeightGrid(spec, kept))


def weight_grid(module: nn.Module) -> WeightGrid | None:
    """The grid recorded for ``module``'s weight, or ``None`` if none was."""
    return getattr(module, GRID_ATTR, None)


def round_weight_(
    module: nn.Module, weight: Tensor, spec: QuantSpec, qparams: QParams | None = None
) -> None:
    """Round ``weight`` (``module``'s ``(out, in)`` view) to ``spec``'s grid in place; record it.

    ``qparams`` default to ``compute_qparams(weight, spec)``."""
    if qparams is None:
        qparams = compute_qparams(weight, spec)
    weight.copy_(fake_quantize(weight, spec, qparams))
    record_grid(module, spec, qparams)


def stored_bits(rows: int, cols: int, spec: QuantSpec) -> int:
    """Bits a packed ``(rows, cols)`` weight on ``spec``'s grid stores: the codes plus each
    block's scale (32 or 16 bits) and zero point (8 bits for an integer zero, a scale's width
    for a float minimum, none when symmetric)."""
    scale_bits = 16 if spec.scale_dtype == "float16" else 32
    zero_bits = 0 if spec.symmetric else 8 if spec.zero_point == "integer" else scale_bits
    scale_rows, scale_cols = spec.granularity.scale_shape(rows, cols)
    return rows * cols * spec.bits + scale_rows * scale_cols * (scale_bits + zero_bits)
