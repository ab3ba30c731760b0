"""CPU linear kernels for packed weights: W8A16 and W4A16 weight-only, W8A8 dynamic, and float
weights kept at 16 bits (fp16/bf16 widened in registers).

Layouts (the shared packing layout): ``w`` is ``(out, in)``; W8 codes are signed int8 (symmetric,
per output channel ``scale (out,)``); W4 codes are unsigned 0…15, two per byte along ``in``
(byte ``j`` holds code ``2j`` in its low nibble, ``2j+1`` in its high one), with asymmetric
per-group ``scale``/``zero`` of shape ``(out, in / group)`` and weight ``(code − zero) · scale``.

Dispatch, measured on the 2-core Sapphire Rapids host (``benchmarks/kernels.py``):

* weight-only, ``M ≤ WEIGHT_ONLY_MAX_M`` tokens: the AVX-512 extension in ``csrc/weight_only.cpp``
  (reads the packed weight once, widens it in registers: decode is memory bound). On the
  1536×576 gate, 1 thread, it is 2.6–3.6× fp32 for M ≤ 8, ~2× at 16, even at 32–64, and stays
  faster than de-quantize + ``F.linear`` up to M = 256 (0.67× vs 0.59× fp32 for W8, 0.51× vs
  0.46× for W4) but not at 512 (0.58× vs 0.89×, 0.42× vs 0.74×): hence the threshold 256;
* weight-only, more tokens (prefill): de-quantize to fp32 once — the extension writes the
  references' floats in one pass (SmolLM2 block: 11.2 ms in torch) — and call MKL's ``F.linear``;
* W8A8: per-token symmetric int8 activations, ``torch._int_mm`` (oneDNN), de-quantized by the
  product of the two scales; quantizing ``x`` and de-quantizing the int32 result are one
  AVX-512 pass each in the extension (in eager torch they cost as much as the GEMM itself).
  ``_int_mm`` needs ``M > 16`` and ``in``/``out`` multiples of 8: fewer rows are zero-padded
  to 17 (the padded rows are dropped), other ``in``/``out`` use the
  exact integer reference (``int32`` matmul) — the result is the same, only slower. With the
  weight's stored codes (``w_unsigned``), up to :data:`SMALL_M` tokens run the extension's
  AVX-512 VNNI kernel instead (decode: SmolLM2 W8A8 eager decode 19.9 → 27.1 tok/s, 1 thread),
  bit-identical too; CPUs without VNNI keep the paths above.

The extension is built on first use (:mod:`channelwise.kernels.extension`); where it is not
available the pure-torch references (:mod:`channelwise.kernels.reference`, re-exported here)
serve every call.

NaN/inf: not checked (a check would cost a pass over ``x`` per call); they propagate. A
non-finite activation makes its token's whole output row non-finite in every kernel.
"""

from __future__ import annotations

import logging
import time
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from channelwise.errors import KernelInputError
from channelwise.kernels.extension import (
    kernel_available,  # noqa: F401  (re-exported)
    loaded_ops,
    vnni_supported,
)
from channelwise.kernels.extension import load_ops as _ops  # cpu._ops: patched and called
from channelwise.kernels.reference import (
    dequantize_acc,
    dequantize_w4,  # noqa: F401  (re-exported)
    dequantize_w8,  # noqa: F401  (re-exported)
    exact_int_matmul,  # noqa: F401  (re-exported)
    half_weight_reference,
    quantize_per_token,
    quantize_static,
    unpack_int4,  # noqa: F401  (re-exported)
    w4a16_reference,
    w8a8_reference,
    w8a16_reference,
)

log = logging.getLogger(__name__)

#: Up to this many tokens the weight-only kernels run; above it, de-quantize + ``F.linear``.
WEIGHT_ONLY_MAX_M = 256
#: The C++ W4 kernel reads 32 codes (16 bytes) per step, so it needs group % 32 == 0.
W4_KERNEL_GROUP_MULTIPLE = 32
_INT_MM_MIN_M = 17
_MAX_M = WEIGHT_ONLY_MAX_M


# ----------------------------------------------------------------------------- public kernels
def _decode_fast_path(kernel: str, x: Tensor, *args) -> Tensor | None:
    """The extension's weight-only ``kernel`` on up to :data:`WEIGHT_ONLY_MAX_M` tokens, with no
    Python-side checks (the extension checks everything, see csrc/weight_only.cpp); None where
    it is not built or refuses the input: the caller then re-checks (a readable error) or takes
    the general path."""
    ops = loaded_ops()
    if ops is None:
        return None
    try:
        if x.numel() <= _MAX_M * x.shape[-1]:
            return getattr(ops, kernel)(x, *args)
    except (RuntimeError, TypeError, IndexError, AttributeError):
        pass
    return None


def w8a16_linear(x: Tensor, w: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y = x @ (w · scale).T + bias``.

    x ``(..., in)`` f32, w ``(out, in)`` int8 codes, scale ``(out,)`` f32. Returns ``(..., out)``.
    """
    y = _decode_fast_path("w8a16_mm", x, w, scale, bias)
    if y is not None:
        return y
    x2 = _check_x(x, w.shape[-1] if isinstance(w, Tensor) and w.dim() == 2 else -1)
    _check_weight(w, torch.int8, "w")
    _check_vector(scale, w.shape[0], "scale")
    _check_bias(bias, w.shape[0])
    ops = _ops() if x2.device.type == "cpu" else None  # the extension is CPU code
    if ops is None:
        y = w8a16_reference(x2, w, scale, bias)
    elif x2.shape[0] <= WEIGHT_ONLY_MAX_M:
        y = ops.w8a16_mm(x2, w, scale.contiguous(), _contig(bias))
    else:  # prefill: the reference's weight, de-quantized in one pass, then MKL
        y = F.linear(x2, ops.dequantize_w8(w, scale.contiguous()), bias)
    return y.view(*x.shape[:-1], w.shape[0])


def w4a16_linear(
    x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group: int, bias: Tensor | None = None
) -> Tensor:
    """W4A16 linear: ``y = x @ W.T + bias`` with ``W = (code − zero) · scale`` per group.

    x ``(..., in)`` f32; packed ``(out, in/2)`` uint8; scale, zero ``(out, in/group)`` f32 (zero
    in code units). Returns ``(..., out)``. Groups that are not multiples of 32 (and prefill)
    take the de-quantize path.
    """
    if type(group) is int and group % W4_KERNEL_GROUP_MULTIPLE == 0:
        y = _decode_fast_path("w4a16_mm", x, packed, scale, zero, group, bias)
        if y is not None:
            return y
    _check_weight(packed, torch.uint8, "packed")
    out, in_features = packed.shape[0], packed.shape[1] * 2
    if not isinstance(group, int) or group < 2 or group % 2 or in_features % group:
        raise KernelInputError(
            f"group must be an even integer dividing in={in_features}, got {group!r}"
        )
    x2 = _check_x(x, in_features)
    for name, t in (("scale", scale), ("zero", zero)):
        if t.dtype != torch.float32 or tuple(t.shape) != (out, in_features // group):
            raise KernelInputError(
                f"{name} must be float32 of shape {(out, in_features // group)}, "
                f"got {t.dtype} {tuple(t.shape)}"
            )
    _check_bias(bias, out)
    on_cpu = x2.device.type == "cpu"  # the extension is CPU code
    ops = _ops() if on_cpu and group % W4_KERNEL_GROUP_MULTIPLE == 0 else None
    if ops is None:
        y = w4a16_reference(x2, packed, scale, zero, group, bias)
    elif x2.shape[0] <= WEIGHT_ONLY_MAX_M:
        args = (x2, packed, scale.contiguous(), zero.contiguous(), group, _contig(bias))
        y = ops.w4a16_mm(*args)
    else:  # prefill: the reference's weight, de-quantized in one pass, then MKL
        w = ops.dequantize_w4(packed, scale.contiguous(), zero.contiguous(), group)
        y = F.linear(x2, w, bias)
    return y.view(*x.shape[:-1], out)


#: Float weight storage the half-weight kernel reads.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def half_weight_linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y = x @ w.T + bias`` for a float weight kept in memory at the 16 bits (fp16 or bf16)
    its checkpoint stores (``--float-dtype``): it reads half the bytes of its fp32 copy.

    x ``(..., in)`` f32, w ``(out, in)`` float16 or bfloat16. Returns ``(..., out)`` f32: the
    same values as widening ``w`` (exact) and ``F.linear`` in float32, summed in another order.
    Up to :data:`WEIGHT_ONLY_MAX_M` tokens the extension widens in registers; more take the
    widen + ``F.linear`` path (MKL).
    """
    y = _decode_fast_path("half_mm", x, w, bias)
    if y is not None:
        return y
    if not isinstance(w, Tensor) or w.dtype not in HALF_DTYPES or w.dim() != 2:
        got = f"{w.dtype} {tuple(w.shape)}" if isinstance(w, Tensor) else type(w).__name__
        raise KernelInputError(f"w must be a 2-D float16 or bfloat16 tensor (out, in), got {got}")
    _check_weight(w, w.dtype, "w")
    x2 = _check_x(x, w.shape[1])
    _check_bias(bias, w.shape[0])
    cpu_rows = x2.device.type == "cpu" and x2.shape[0] <= WEIGHT_ONLY_MAX_M
    ops = _ops() if cpu_rows else None
    if ops is None:
        y = half_weight_reference(x2, w, bias)
    else:
        y = ops.half_mm(x2, w, _contig(bias))
    return y.view(*x.shape[:-1], w.shape[0])


def w8a8_linear(
    x: Tensor,
    w: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    x_scale: float | None = None,
    w_zero: Tensor | None = None,
    w_packed: Tensor | None = None,
    w_unsigned: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """W8A8: symmetric int8 ``x`` — per token (dynamic), or with one calibrated ``x_scale``
    (static; OutlierTune's scale-1 integers, DGQ's per-tensor scale) — ``torch._int_mm``,
    de-quantize.

    x ``(..., in)`` f32, w ``(out, in)`` int8 codes, w_scale ``(out,)``, weight
    ``(w − w_zero)·w_scale``: ``w_zero`` ``(out,)`` int32 for asymmetric weights (stored offset
    by −128 into int8), else symmetric codes in −127…127. The zero point is applied exactly in
    int32 (``acc − rowsum(x_q)·w_zero``). ``w_packed`` (:func:`prepack_int8` of ``w``, symmetric
    weights) runs oneDNN's int8 linear on the pre-packed weight instead of ``torch._int_mm``,
    which re-lays ``w`` out on every call (512-token SmolLM2 gate: 0.51 vs 0.79 ms, 1 thread).
    ``w_unsigned`` (:func:`unsigned_codes`: the codes as packed modules store them, unsigned, and
    their zero per row) lets up to :data:`SMALL_M` tokens (decode) take the extension's VNNI
    kernel, which reads each weight byte once (oneDNN and ``_int_mm`` are slow for a few rows).
    Returns ``(..., out)``; bit-identical to :func:`w8a8_reference`. On CUDA tensors the
    quantizers are torch's and the GEMM is ``torch._int_mm`` (cuBLASLt), with the same rules.
    """
    if x_scale is not None and not (isinstance(x_scale, float) and 0 < x_scale < float("inf")):
        raise KernelInputError(f"x_scale must be a positive finite float, got {x_scale!r}")
    x2 = _check_x(x, w.shape[-1] if isinstance(w, Tensor) and w.dim() == 2 else -1)
    _check_weight(w, torch.int8, "w")
    _check_vector(w_scale, w.shape[0], "w_scale")
    _check_bias(bias, w.shape[0])
    m, (out, in_features) = x2.shape[0], w.shape
    if w_zero is not None and (
        not isinstance(w_zero, Tensor) or w_zero.dtype != torch.int32 or w_zero.shape != (out,)
    ):
        got = f"{w_zero.dtype} {tuple(w_zero.shape)}" if isinstance(w_zero, Tensor) else w_zero
        raise KernelInputError(f"w_zero must be int32 of shape ({out},), got {got}")
    if w_packed is not None and tuple(getattr(w_packed, "shape", ())) != (in_features, out):
        got = tuple(w_packed.shape) if isinstance(w_packed, Tensor) else type(w_packed).__name__
        raise KernelInputError(
            f"w_packed must be prepack_int8(w), shape ({in_features}, {out}), got {got}"
        )
    if w_unsigned is not None:
        _check_unsigned(w_unsigned, out, in_features)
    on_cpu = x2.device.type == "cpu"  # elsewhere (CUDA): torch's quantizers and _int_mm
    ops = _ops() if on_cpu else None  # one-pass AVX-512 quantize / de-quantize (eager: ~8)
    if on_cpu and small_m_kernel(m, w_unsigned is not None):
        xq, x_scale = _tokens_quantized(x, x2, ops, x_scale)
        y = ops.w8a8_small_mm(xq, x_scale, *w_unsigned, w_scale.contiguous(), _contig(bias))
        return y.view(*x.shape[:-1], out)
    if out % 8 or in_features % 8:
        return w8a8_reference(x2, w, w_scale, bias, x_scale, w_zero).view(*x.shape[:-1], out)
    xq, x_scale = _tokens_quantized(x, x2, ops, x_scale)
    w_scale, bias = w_scale.contiguous(), _contig(bias)
    # oneDNN picks a kernel ~100x slower for one row into <= 256 outputs (2-4 ms against 0.03
    # for _int_mm: SmolLM2's k/v projections at decode, torch 2.13): _int_mm takes those.
    onednn = (
        w_packed is not None and on_cpu and w_zero is None and (m >= _INT_MM_MIN_M or out > 256)
    )
    if onednn:  # y = float(acc)·w_scale, then per token
        zeros = _int64_zeros(out)
        y = torch.ops.onednn.qlinear_pointwise(
            xq, 1.0, 0, w_packed, w_scale, zeros, None, 1.0, 0, torch.float32, "none", [None], ""
        )
        if ops:
            y = ops.scale_rows_(y, x_scale, bias)
        else:
            y = y.mul_(x_scale) if bias is None else y.mul_(x_scale).add_(bias)
        return y.view(*x.shape[:-1], out)
    if m < _INT_MM_MIN_M:
        xq = F.pad(xq, (0, 0, 0, _INT_MM_MIN_M - m))
    acc = torch._int_mm(xq, w.T)[:m]
    rowsum = None if w_zero is None else xq[:m].sum(dim=1, dtype=torch.int32)
    if ops:
        y = ops.dequantize_acc_(acc, x_scale, w_scale, bias, rowsum, _contig(w_zero))
    else:
        if w_zero is not None:
            acc = acc - rowsum[:, None] * w_zero[None, :]
        y = dequantize_acc(acc, x_scale, w_scale, bias)
    return y.view(*x.shape[:-1], out)


#: Up to this many tokens W8A8 with ``w_unsigned`` runs the extension's VNNI kernel.
SMALL_M = 16


def unsigned_codes(u: Tensor, zero: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(u, zero)`` for :func:`w8a8_linear`'s ``w_unsigned``: the weight ``u − zero`` as uint8
    codes ``(out, in)`` and an int32 zero per row; without ``zero``, 128 (symmetric int8 codes
    stored offset by 128, as packed modules store them)."""
    _check_weight(u, torch.uint8, "u")
    if zero is None:
        return u, torch.full((u.shape[0],), 128, dtype=torch.int32)
    return u, zero.to(torch.int32).contiguous()


def _check_unsigned(w_unsigned, out: int, in_features: int) -> None:
    u, zero = w_unsigned
    ok = isinstance(u, Tensor) and u.dtype == torch.uint8 and tuple(u.shape) == (out, in_features)
    ok = ok and isinstance(zero, Tensor) and zero.dtype == torch.int32 and zero.shape == (out,)
    if not ok:
        raise KernelInputError(
            f"w_unsigned must be unsigned_codes(...) of this weight: uint8 ({out}, {in_features}) "
            f"and int32 ({out},)"
        )


def small_m_kernel(m: int, have_codes: bool = True) -> bool:
    """Whether :func:`w8a8_linear` runs ``m`` tokens on the extension's VNNI kernel."""
    return have_codes and m <= SMALL_M and vnni_supported() and _ops() is not None


def prepack_int8(w: Tensor) -> Tensor | None:
    """``w`` ``(out, in)`` int8 in oneDNN's blocked layout, for :func:`w8a8_linear`'s
    ``w_packed`` (a second copy of the weight: 1 byte per weight), or None where this torch has
    no oneDNN int8 linear (then ``torch._int_mm`` serves). Packed modules pack only where
    :func:`onednn_int8_fast`."""
    _check_weight(w, torch.int8, "w")
    try:
        return torch.ops.onednn.qlinear_prepack(w, [1, w.shape[1]])
    except (AttributeError, RuntimeError, NotImplementedError) as error:
        log.info("oneDNN int8 prepack unavailable (%s); torch._int_mm serves W8A8", error)
        return None


#: oneDNN's int8 linear may take this many times ``torch._int_mm``'s time and still serve.
_ONEDNN_SLOWER_AT_MOST = 2.0
_onednn_verdict: list[bool] = []


def onednn_int8_fast() -> bool:
    """Whether oneDNN's int8 linear on a pre-packed weight (:func:`prepack_int8`) is at least
    about as fast as ``torch._int_mm`` on this CPU; measured once per process on a 64×512×512
    product (a few ms, or ~0.2 s where it is slow). On some hosts oneDNN falls back to a
    reference kernel ~4,000× slower than ``_int_mm`` (AMD EPYC under torch 2.13: 11.9 s against
    3.1 ms for a 512-token SmolLM2 gate), so the choice cannot be made from the torch build."""
    if not _onednn_verdict:
        _onednn_verdict.append(_measure_onednn_int8())
    return _onednn_verdict[0]


def _measure_onednn_int8() -> bool:
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (512, 512), generator=g, dtype=torch.int8)
    xq = torch.randint(-127, 128, (64, 512), generator=g, dtype=torch.int8)
    packed = prepack_int8(w)
    if packed is None:
        return False
    scale, zeros = torch.ones(512), torch.zeros(512, dtype=torch.int64)

    def onednn() -> None:
        torch.ops.onednn.qlinear_pointwise(
            xq, 1.0, 0, packed, scale, zeros, None, 1.0, 0, torch.float32, "none", [None], ""
        )

    def int_mm() -> None:
        torch._int_mm(xq, w.T)

    def best_of(run, n: int) -> float:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    try:
        int_mm()
        reference = best_of(int_mm, 5)
        first = best_of(onednn, 1)  # builds the primitive; a slow kernel shows here already
        if first > 50 * _ONEDNN_SLOWER_AT_MOST * reference + 0.05:
            fast = False
        else:
            fast = best_of(onednn, 5) <= _ONEDNN_SLOWER_AT_MOST * reference
    except RuntimeError as error:
        log.info("oneDNN int8 linear failed (%s); torch._int_mm serves W8A8", error)
        return False
    if not fast:
        log.info("oneDNN's int8 linear is slow on this CPU; torch._int_mm serves W8A8")
    return fast


_zeros: dict[int, Tensor] = {}


def _int64_zeros(n: int) -> Tensor:
    """One zero-point vector per width, reused: oneDNN keys its primitive cache on the operand
    tensors, and a fresh vector per call rebuilt the primitive every time (~1 ms a decode call)."""
    zeros = _zeros.get(n)
    if zeros is None:
        zeros = _zeros[n] = torch.zeros(n, dtype=torch.int64)
    return zeros


_last_quantized: list = [None]


def _tokens_quantized(x: Tensor, x2: Tensor, ops, scale: float | None) -> tuple[Tensor, Tensor]:
    """Int8 codes of ``x`` and their per-token scales, reused when the same tensor, unchanged,
    comes again with the same quantizer: a block's q/k/v (and gate/up) projections read one
    input, which was quantized 3 (2) times. The entry holds ``x`` weakly and is keyed by its
    identity, its version (in-place writes bump it) and the static scale, so a reuse always sees
    the same numbers."""
    version = None if torch.compiler.is_compiling() else tensor_version(x)
    last = _last_quantized[0]
    if version is not None and last is not None:
        if last[0]() is x and last[1] == version and last[2] == scale:
            return last[3]
    if scale is None:
        codes = ops.quantize_per_token(x2) if ops else quantize_per_token(x2)
    else:
        codes = ops.quantize_static(x2, scale) if ops else quantize_static(x2, scale)
    if version is not None:  # an inference-mode tensor has no version: no safe reuse
        _last_quantized[0] = (weakref.ref(x), version, scale, codes)
    return codes


def tensor_version(t: Tensor) -> int | None:
    """``t``'s in-place write counter, or None for a tensor made under ``torch.inference_mode``
    (it has none, and reading ``_version`` raises)."""
    return None if t.is_inference() else t._version


# ----------------------------------------------------------------------------- validation
def _check_x(x: Tensor, in_features: int) -> Tensor:
    if not isinstance(x, Tensor) or x.dtype != torch.float32:
        raise KernelInputError(f"x must be a float32 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise KernelInputError(
            f"x must end in in_features={in_features}, got shape {tuple(x.shape)}"
        )
    return x.reshape(-1, in_features).contiguous()


def _check_weight(w: Tensor, dtype: torch.dtype, name: str) -> None:
    if not isinstance(w, Tensor) or w.dtype != dtype or w.dim() != 2:
        got = f"{w.dtype} {tuple(w.shape)}" if isinstance(w, Tensor) else type(w).__name__
        raise KernelInputError(f"{name} must be a 2-D {dtype} tensor (out, in), got {got}")
    if not w.is_contiguous():
        raise KernelInputError(f"{name} must be contiguous (pack it row-major)")


def _check_vector(t: Tensor, n: int, name: str) -> None:
    if not isinstance(t, Tensor) or t.dtype != torch.float32 or t.shape != (n,):
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise KernelInputError(f"{name} must be float32 of shape ({n},), got {got}")


def _check_bias(bias: Tensor | None, n: int) -> None:
    if bias is not None:
        _check_vector(bias, n, "bias")


def _contig(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()
