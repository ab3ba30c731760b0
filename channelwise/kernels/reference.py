"""The pure-torch side of the CPU kernels: de-quantization, int8 quantizers, and reference
linears that every kernel is checked against (and that serve where the extension does not)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


# ----------------------------------------------------------------------------- de-quantization
def unpack_int4(packed: Tensor) -> Tensor:
    """``(out, in/2)`` uint8 → ``(out, in)`` uint8 codes (low nibble = even column)."""
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1)
    return codes.reshape(packed.shape[0], 2 * packed.shape[1])


def dequantize_w8(w: Tensor, scale: Tensor) -> Tensor:
    """``(out, in)`` int8 codes × ``(out,)`` scales → ``(out, in)`` float32."""
    return w.float() * scale[:, None]


def dequantize_w4(packed: Tensor, scale: Tensor, zero: Tensor, group: int) -> Tensor:
    """``(out, in/2)`` packed codes, ``(out, in/group)`` scale/zero → ``(out, in)`` float32."""
    codes = unpack_int4(packed).float().view(packed.shape[0], -1, group)
    return ((codes - zero[..., None]) * scale[..., None]).view(packed.shape[0], -1)


def quantize_static(x: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Symmetric int8 with one calibrated ``scale``: codes ``clamp(round(x / scale), −128, 127)``
    ``(M, in)`` int8 (the fake quantizer's), and the scale per row ``(M, 1)``, NaN for a row
    holding a non-finite value (its output row is then NaN, not that of clamped codes)."""
    codes = torch.round(x / torch.tensor(scale, dtype=torch.float32)).clamp_(-128, 127)
    column = torch.full((x.shape[0], 1), scale, dtype=torch.float32, device=x.device)
    column.masked_fill_(~torch.isfinite(x).all(dim=-1, keepdim=True), float("nan"))
    return codes.nan_to_num_(0).to(torch.int8), column


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row: ``(M, in)`` float → codes ``(M, in)`` int8, scales ``(M, 1)``.

    An all-zero row gets scale 1 (codes 0), so it stays exactly zero.
    """
    scale = x.abs().amax(dim=-1, keepdim=True) / 127.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # NaN stays NaN
    return torch.round(x / scale).clamp_(-127, 127).to(torch.int8), scale


# ----------------------------------------------------------------------------- references
def w8a16_reference(x: Tensor, w: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """Pure-torch W8A16: de-quantize, then ``F.linear``. ``(M, in)`` → ``(M, out)``."""
    return F.linear(x, dequantize_w8(w, scale), bias)


def half_weight_reference(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """Pure-torch 16-bit float weight: widen to float32 (exact), then ``F.linear``."""
    return F.linear(x, w.float(), bias)


def w4a16_reference(
    x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group: int, bias: Tensor | None = None
) -> Tensor:
    """Pure-torch W4A16: unpack + de-quantize, then ``F.linear``. ``(M, in)`` → ``(M, out)``."""
    return F.linear(x, dequantize_w4(packed, scale, zero, group), bias)


def w8a8_reference(
    x: Tensor,
    w: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    x_scale: float | None = None,
    w_zero: Tensor | None = None,
) -> Tensor:
    """Exact W8A8: int8 ``x`` (per token, or with the static ``x_scale``), int32 products with
    ``w − w_zero`` summed exactly, then both scales."""
    xq, x_scale = quantize_per_token(x) if x_scale is None else quantize_static(x, x_scale)
    w32 = (
        w.to(torch.int32) if w_zero is None else w.to(torch.int32) - w_zero.to(torch.int32)[:, None]
    )
    return dequantize_acc(exact_int_matmul(xq, w32.T), x_scale, w_scale, bias)


def exact_int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` of integer tensors, exactly, as int32: an int32 matmul on the CPU; elsewhere
    (CUDA has no integer matmul) in float64, whose sums of these products are exact: int8
    activations times weights within ±255 stay below 2⁵³ for any ``in`` under 10¹¹."""
    if a.device.type == "cpu":
        return a.to(torch.int32) @ b.to(torch.int32)
    return _int_matmul_in_float64(a, b)


def _int_matmul_in_float64(a: Tensor, b: Tensor) -> Tensor:
    return (a.double() @ b.double()).to(torch.int32)


def dequantize_acc(acc: Tensor, x_scale: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    """int32 sums ``(M, out)`` → float32 ``acc·w_scale·x_scale + bias``."""
    y = acc.to(torch.float32).mul_(w_scale).mul_(x_scale)  # oneDNN's order: weight scale first
    return y.add_(bias) if bias is not None else y
