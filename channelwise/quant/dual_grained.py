"""The dual-grained weight format of DGQ and its two-phase grid search.

Zhang et al., "Dual Grained Quantization: Efficient Fine-Grained Quantization for LLM",
arXiv 2310.04836. A weight ``W`` ``(out, in)`` is stored as

- ``codes`` ``q`` ``(out, in)`` uint8 in ``[0, 15]`` (u4, asymmetric), one zero ``z`` per group of
  ``group_size`` consecutive input channels: ``zeros`` ``(out, in // g)`` uint8 in ``[0, 15]``;
- an integer group scale ``S2`` ``(out, in // g)`` int8 in ``[1, 127]``;
- a float per-output-channel scale ``s1`` ``(out,)`` float32.

The group scale is ``s1·S2``, and ``S2·(q − z)`` must be an exact int8: each code is restricted to
``[z − ⌊127/S2⌋, z + ⌊127/S2⌋] ∩ [0, 15]``. So ``W_int8 = S2·(q − z)`` (``int8_weight``) feeds an
INT8 GEMM with INT8 activations, ``y = s_x·s1·(X_int8 @ W_int8ᵀ)``, and the fake-quant weight is
``s1·W_int8`` (``dequantize``), bit for bit in float32.

Search (``dgq_quantize``), with ``H = XᵀX / T`` the Gram matrix of the layer's calibration inputs:

1. per group, clip ratios ``r_i = 1.02 − 0.22·(i+1)/20`` (i = 0..19) scale the group's range
   (``[min(w, 0), max(w, 0)]``); u4 asymmetric scale ``S_g`` and zero ``z``; per (row, group)
   keep the ``r`` with least ``mean_t ‖X_g (w_g − Q(w_g))‖² = e_g H_gg e_gᵀ``;
2. per row, ``r_j = 1.02 − 0.82·(j+1)/80`` (j = 0..79): ``s1 = r·max|W_c|/127``,
   ``S2 = clamp(round(S_g/s1), 1, 127)``, codes re-rounded on ``s1·S2`` under the int8-fit
   restriction; keep the ``r`` with least full-row output error ``e H eᵀ``.

The Gram form equals the token-averaged output error of the paper exactly, over every token used
to build ``H``, and costs ``O(out·in²)`` per candidate whatever the number of tokens. ``H = None``
means the identity (plain weight MSE). Ties keep the earlier candidate, so the search never does
worse than its first candidate on the error it measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from channelwise.errors import NonFiniteError, QuantConfigError

QMAX = 15  #: largest u4 code
INT8_MAX = 127  #: largest |S2·(q − z)| and largest S2
PHASE1_RATIOS = tuple(1.02 - 0.22 * (i + 1) / 20 for i in range(20))
PHASE2_RATIOS = tuple(1.02 - 0.82 * (j + 1) / 80 for j in range(80))
_TINY = torch.finfo(torch.float32).tiny  # s1 is floored here so codes never divide by zero


@dataclass
class DualGrainedWeight:
    """A DGQ weight: ``codes`` ``(out, in)`` uint8, ``zeros`` and ``S2`` ``(out, in // g)``
    (uint8, int8), ``s1`` ``(out,)`` float32, and the ``group_size`` ``g``."""

    codes: Tensor
    zeros: Tensor
    S2: Tensor
    s1: Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def to(self, device: torch.device | str) -> DualGrainedWeight:
        return DualGrainedWeight(
            *(t.to(device) for t in (self.codes, self.zeros, self.S2, self.s1)), self.group_size
        )


def int8_weight(dgw: DualGrainedWeight) -> Tensor:
    """``W_int8 = S2·(q − z)`` ``(out, in)`` int8 in ``[−127, 127]``: the INT8 GEMM's weight."""
    g = dgw.group_size
    q = dgw.codes.to(torch.int16).unflatten(1, (-1, g))
    z = dgw.zeros.to(torch.int16)[:, :, None]
    S2 = dgw.S2.to(torch.int16)[:, :, None]
    return (S2 * (q - z)).flatten(1).to(torch.int8)


def dequantize(dgw: DualGrainedWeight) -> Tensor:
    """The float32 weight ``s1·S2·(q − z)`` ``(out, in)``, computed as ``s1 · int8_weight``."""
    return dgw.s1.float()[:, None] * int8_weight(dgw).float()


def check_weight(W: Tensor, group_size: int, name: str = "weight") -> None:
    """Raise a clear error unless ``W`` is a finite 2-D float tensor whose rows split in groups."""
    if not isinstance(W, Tensor) or W.dim() != 2 or not W.is_floating_point() or W.numel() == 0:
        shape = tuple(W.shape) if isinstance(W, Tensor) else type(W).__name__
        raise QuantConfigError(f"DGQ: {name} must be a non-empty 2-D float tensor, got {shape}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise QuantConfigError(f"DGQ: group size must be a positive integer, got {group_size!r}")
    if W.shape[1] % group_size:
        raise QuantConfigError(
            f"DGQ: group size {group_size} does not divide the {W.shape[1]} input channels of "
            f"{name}; use a divisor of {W.shape[1]} (e.g. 64 for SmolLM2's 576)"
        )
    finite = torch.isfinite(W)
    if not bool(finite.all()):
        raise NonFiniteError(
            f"DGQ: {name} contains {int((~finite).sum())} NaN/inf values; cannot quantize it"
        )


def search_group_scales(
    W: Tensor, H: Tensor | None, group_size: int, ratios: tuple[float, ...] = PHASE1_RATIOS
) -> tuple[Tensor, Tensor, Tensor]:
    """Phase 1: per (row, group) the u4 scale ``S_g`` and zero ``z`` with least output error.

    ``W`` ``(out, in)``, ``H`` ``(in, in)`` or ``None``. Returns ``S_g`` ``(out, G)`` (0 for an
    all-zero group), ``z`` ``(out, G)`` (float holding integers in ``[0, 15]``) and the error
    ``e_g H_gg e_gᵀ`` of the kept candidate ``(out, G)``, all in ``W``'s compute dtype.
    """
    Wg, Hg = _grouped(W, H, group_size)
    lo = Wg.amin(dim=-1).clamp(max=0)
    hi = Wg.amax(dim=-1).clamp(min=0)
    best_err = torch.full_like(lo, float("inf"))
    best_scale, best_zero = torch.zeros_like(lo), torch.zeros_like(lo)
    for r in ratios:
        scale = (hi - lo) * r / QMAX
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo * r / safe).clamp(0, QMAX)
        q = torch.clamp(torch.round(Wg / safe[..., None]) + zero[..., None], 0, QMAX)
        err = _group_error(Wg - safe[..., None] * (q - zero[..., None]), Hg)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero, best_err


def search_channel_scales(
    W: Tensor,
    H: Tensor | None,
    S_g: Tensor,
    zero: Tensor,
    group_size: int,
    ratios: tuple[float, ...] = PHASE2_RATIOS,
) -> tuple[Tensor, Tensor, Tensor]:
    """Phase 2: per row the channel scale ``s1`` with least full-row output error ``e H eᵀ``.

    ``S_g``, ``zero`` ``(out, G)`` come from phase 1. Returns ``s1`` ``(out,)`` (float32 values),
    ``S2`` ``(out, G)`` (float holding integers in ``[1, 127]``) and the kept error ``(out,)``.
    """
    W = _compute(W)
    absmax = W.abs().amax(dim=1)
    best_err = torch.full_like(absmax, float("inf"))
    best_s1 = torch.ones_like(absmax)
    for r in ratios:
        s1 = _channel_scale(absmax, r, W.dtype)
        S2 = _integer_group_scale(S_g, s1)
        err = _row_error(W - _fake_quant(W, s1, S2, zero, group_size), H)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s1 = torch.where(better, s1, best_s1)
    return best_s1, _integer_group_scale(S_g, best_s1), best_err


def dgq_quantize(
    W: Tensor,
    H: Tensor | None = None,
    group_size: int = 64,
    *,
    phase1_ratios: tuple[float, ...] = PHASE1_RATIOS,
    phase2_ratios: tuple[float, ...] = PHASE2_RATIOS,
    name: str = "weight",
) -> DualGrainedWeight:
    """Quantize ``W`` ``(out, in)`` to the dual-grained format by the two-phase search.

    ``H`` ``(in, in)`` is ``XᵀX / T`` of the layer's inputs (``None``: plain weight MSE). Computes
    in float64 if ``W`` is float64, else float32; ``name`` labels the layer in errors.
    """
    check_weight(W, group_size, name)
    if H is not None and (H.dim() != 2 or tuple(H.shape) != (W.shape[1],) * 2):
        raise QuantConfigError(
            f"DGQ: the Gram matrix of {name} must be ({W.shape[1]}, {W.shape[1]}), "
            f"got {tuple(H.shape)}"
        )
    if H is not None and not bool(torch.isfinite(H).all()):
        raise NonFiniteError(f"DGQ: the calibration inputs of {name} contain NaN/inf")
    W = _compute(W)
    H = None if H is None else H.to(device=W.device, dtype=W.dtype)
    S_g, zero, _ = search_group_scales(W, H, group_size, phase1_ratios)
    s1, S2, _ = search_channel_scales(W, H, S_g, zero, group_size, phase2_ratios)
    codes = _codes(W, s1, S2, zero, group_size)
    return DualGrainedWeight(
        codes=codes.flatten(1).to(torch.uint8),
        zeros=zero.to(torch.uint8),
        S2=S2.to(torch.int8),
        s1=s1.float(),
        group_size=group_size,
    )


def output_error(W: Tensor, W_hat: Tensor, H: Tensor | None = None) -> Tensor:
    """Per-row output error ``(W − Ŵ) H (W − Ŵ)ᵀ`` ``(out,)`` (``H = None``: squared error)."""
    W = _compute(W)
    H = None if H is None else H.to(device=W.device, dtype=W.dtype)
    return _row_error(W - W_hat.to(W), H)


# --- helpers -------------------------------------------------------------------------------------


def _compute(W: Tensor) -> Tensor:
    return W.detach().to(torch.float64 if W.dtype == torch.float64 else torch.float32)


def _grouped(W: Tensor, H: Tensor | None, g: int) -> tuple[Tensor, Tensor | None]:
    """``W`` as ``(out, G, g)``, and ``H``'s diagonal blocks as ``(G, g, g)``."""
    W = _compute(W)
    Wg = W.unflatten(1, (-1, g))
    if H is None:
        return Wg, None
    n = W.shape[1] // g
    H = H.to(device=W.device, dtype=W.dtype)
    idx = torch.arange(n, device=W.device)
    return Wg, H.unflatten(0, (n, g)).unflatten(2, (n, g))[idx, :, idx]


def _group_error(e: Tensor, Hg: Tensor | None) -> Tensor:
    """``e_g H_gg e_gᵀ`` per (row, group): ``e`` ``(out, G, g)``, ``Hg`` ``(G, g, g)``."""
    if Hg is None:
        return e.square().sum(dim=-1)
    return (torch.einsum("ogi,gij->ogj", e, Hg) * e).sum(dim=-1)


def _row_error(e: Tensor, H: Tensor | None) -> Tensor:
    if H is None:
        return e.square().sum(dim=-1)
    return ((e @ H) * e).sum(dim=-1)


def _channel_scale(absmax: Tensor, r: float, dtype: torch.dtype) -> Tensor:
    """``s1 = r·max|W_c|/127`` rounded to float32 (its storage type) and floored at float32's
    tiny; an all-zero row gets ``s1 = 1``."""
    s1 = (absmax * r / INT8_MAX).float().clamp(min=_TINY)
    return torch.where(absmax > 0, s1, torch.ones_like(s1)).to(dtype)


def _integer_group_scale(S_g: Tensor, s1: Tensor) -> Tensor:
    return torch.round(S_g / s1[:, None]).clamp(1, INT8_MAX)


def _offsets(W: Tensor, s1: Tensor, S2: Tensor, zero: Tensor, g: int) -> Tensor:
    """``q − z`` ``(out, G, g)`` on the scale ``s1·S2``, with ``q`` within ``[0, 15]`` and the
    int8-fit window ``[z − ⌊127/S2⌋, z + ⌊127/S2⌋]``."""
    reach = torch.floor(INT8_MAX / S2)
    lower = torch.maximum(-reach, -zero)[..., None]
    upper = torch.minimum(reach, QMAX - zero)[..., None]
    d = torch.round(W.unflatten(1, (-1, g)) / (s1[:, None] * S2)[..., None])
    return torch.clamp(d, min=lower, max=upper)


def _codes(W: Tensor, s1: Tensor, S2: Tensor, zero: Tensor, g: int) -> Tensor:
    """u4 codes ``q`` ``(out, G, g)`` (float holding integers in ``[0, 15]``)."""
    return _offsets(W, s1, S2, zero, g) + zero[..., None]


def _fake_quant(W: Tensor, s1: Tensor, S2: Tensor, zero: Tensor, g: int) -> Tensor:
    """``s1·(S2·(q − z))`` ``(out, in)``: the same arithmetic as ``dequantize``."""
    d = _offsets(W, s1, S2, zero, g).mul_(S2[..., None])
    return d.mul_(s1[:, None, None]).flatten(1)


__all__ = [
    "INT8_MAX",
    "PHASE1_RATIOS",
    "PHASE2_RATIOS",
    "QMAX",
    "DualGrainedWeight",
    "check_weight",
    "dequantize",
    "dgq_quantize",
    "int8_weight",
    "output_error",
    "search_channel_scales",
    "search_group_scales",
]


DUAL_GRAINED_ATTR = "_channelwise_dual_grained"


def record_dual_grained(module: torch.nn.Module, dgw: DualGrainedWeight) -> None:
    """Remember the dual-grained format ``module``'s weight was written from, so packing can
    store its 4-bit codes and integer group scales instead of the widened int8 rows."""
    setattr(module, DUAL_GRAINED_ATTR, dgw)


def recorded_dual_grained(module: torch.nn.Module) -> DualGrainedWeight | None:
    """The format :func:`record_dual_grained` left on ``module``, or None."""
    return getattr(module, DUAL_GRAINED_ATTR, None)
