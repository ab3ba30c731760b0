"""Learnable per-channel dual clipping of a linear's input.

RepQuant (Li, Liu, Zhang, Gu, "RepQuant: Towards Accurate Post-Training Quantization of Large
Transformer Models via Scale Reparameterization", arXiv 2402.05628) quantizes post-LayerNorm
activations per channel with a lower and an upper clipping bound per channel, both learned, and
then reparameterizes the per-channel grids into one per-tensor grid. Here each channel's bounds
are its calibrated range times a learnable factor each, ``lower = lower₀·α``, ``upper = upper₀·β``
(α = β = 1 at the start, so the quantizer starts as the calibrated one); the grid is the
asymmetric integer grid over ``[min(lower, 0), max(upper, 0)]``, exactly the one
:func:`~channelwise.quant.core.qparams_from_range` gives, so the learned bounds become ordinary
per-channel ``QParams``. The paper's own parameterization of the bounds was not retrieved (no
official code); the factors follow OmniQuant's learnable weight clipping.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from channelwise.errors import QuantConfigError
from channelwise.quant.core import QParams, QuantSpec, _check_finite, qparams_from_range
from channelwise.quant.granularity import PerColumn

#: Factors are clamped to at least this, so a bound never crosses zero or collapses.
MIN_FACTOR = 0.01


def round_straight_through(x: Tensor) -> Tensor:
    """``round(x)`` exactly in the forward pass; gradient 1 (the straight-through estimator)."""
    return x.round().detach() + (x - x.detach())


def fake_quantize_between(x: Tensor, lower: Tensor, upper: Tensor, spec: QuantSpec) -> Tensor:
    """Fake-quantize ``x`` ``(..., C)`` per channel on the asymmetric integer grid of ``spec``
    spanning ``[min(lower, 0), max(upper, 0)]`` (``lower``, ``upper``: ``(C,)``).

    The forward values equal ``fake_quantize`` with ``qparams_from_range(lower, upper)`` per
    column. Gradients reach ``x`` where it is inside the range and both bounds through the scale
    and zero point, rounding straight through (LSQ's estimator): a value clipped at the top
    pulls ``upper``, one clipped at the bottom pulls ``lower``.
    """
    if spec.symmetric or spec.float_zero:
        raise QuantConfigError(
            "dual clipping needs an asymmetric quantizer with integer zero points"
        )
    _check_finite(x)
    lo = lower.clamp(max=0)
    hi = upper.clamp(min=0)
    scale = (hi - lo) / (spec.qmax - spec.qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(round_straight_through(-lo / scale), spec.qmin, spec.qmax)
    codes = torch.clamp(round_straight_through(x / scale) + zero, spec.qmin, spec.qmax)
    return ((codes - zero) * scale).to(x.dtype)


class ClippingQuantizer:
    """Static per-channel input pre-hook (like ``InputQuantizer``) whose per-channel bounds are
    ``bounds₀ ⊙ factors``, ``factors`` ``(2, C)`` a leaf tensor to train (row 0 scales the lower
    bounds, row 1 the upper). Install it with ``install_input_quantizer``; read the learned grid
    from :attr:`qparams`."""

    def __init__(self, spec: QuantSpec, qparams: QParams) -> None:
        if spec.scale_dtype != "float32" or spec.symmetric or spec.float_zero:
            raise QuantConfigError(
                "dual clipping needs an asymmetric quantizer with integer zero points and "
                f"float32 scales; got {spec}"
            )
        self.spec = replace(spec, granularity=PerColumn())
        scale = qparams.scale.reshape(-1).float()
        zero = qparams.zero_point.reshape(-1).float()
        lower, upper = (self.spec.qmin - zero) * scale, (self.spec.qmax - zero) * scale
        self.initial = torch.stack([lower, upper])
        self.factors = torch.ones_like(self.initial)

    def bounds(self) -> tuple[Tensor, Tensor]:
        """``(lower, upper)``, each ``(C,)``, differentiable in :attr:`factors`."""
        clipped = self.initial * self.factors.clamp(min=MIN_FACTOR)
        return clipped[0], clipped[1]

    @property
    def qparams(self) -> QParams:
        """The current grid as per-channel ``QParams`` ``(1, C)``."""
        lower, upper = (b.detach().reshape(1, -1) for b in self.bounds())
        return qparams_from_range(lower, upper, self.spec)

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        lower, upper = self.bounds()
        return (fake_quantize_between(args[0], lower, upper, self.spec), *args[1:])

    def __repr__(self) -> str:
        return f"ClippingQuantizer({self.initial.shape[1]} channels, {self.spec})"
