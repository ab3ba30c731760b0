"""How packed modules reach the integer kernels of :mod:`channelwise.kernels`.

The global switch (:func:`use_kernels`), the rule for which input quantizers the int8 GEMM can
take over (:func:`int8_input_scale`), and :class:`KernelDispatch`, the base of the packed
modules: which kernel their grid fits, and that kernel with its weight operands, built once and
reused while the buffers they came from are unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from channelwise import kernels
from channelwise.quant import PerGroup, PerRow, PerTensor, QuantSpec
from channelwise.quant.activation import InputQuantizer, input_quantizer

_KERNELS = {"on": True}
_WATCHED = ("qweight", "scale", "zero", "group_scale", "group_zero")
DYNAMIC = "dynamic"


def use_kernels(enabled: bool) -> bool:
    """Route packed linears through the integer CPU kernels (default) or, with ``False``,
    through the reference path (dequantize, float GEMM: bit-identical to fake-quant). Returns
    the previous setting. The kernels differ from the reference only in float summation order
    (W8A16/W4A16) or sum exactly in int32 (W8A8)."""
    before = _KERNELS["on"]
    _KERNELS["on"] = bool(enabled)
    return before


def kernels_enabled() -> bool:
    """Whether packed (and 16-bit float) modules route through the CPU kernels now."""
    return _KERNELS["on"]


def int8_input_scale(quantizer: InputQuantizer) -> float | str | None:
    """How the int8 GEMM can take over ``quantizer``'s rounding: :data:`DYNAMIC` (symmetric int8
    per token, min-max, no clipping: scales computed per call), a float (symmetric int8 per
    tensor with that calibrated scale and zero point 0: OutlierTune, DGQ), or None (it cannot;
    the input is fake-quantized and the product runs in float)."""
    spec, qparams = quantizer.spec, quantizer.qparams
    if (spec.bits, spec.symmetric) != (8, True):
        return None
    if qparams is None:
        plain = spec.range_method == "minmax" and spec.clip_ratio == 1.0
        return DYNAMIC if plain and isinstance(spec.granularity, PerRow) else None
    if torch.compiler.is_compiling():  # reading the calibrated scale would break the graph:
        return None  # PackedLinear uses the number build_kernel_operands read eagerly
    if not isinstance(spec.granularity, PerTensor) or qparams.scale.numel() != 1:
        return None
    scale = float(qparams.scale)
    if not 0 < scale < float("inf") or bool(qparams.zero_point.ne(0).any()):
        return None
    return scale


class _KernelCall:
    """``kernel(x, *operands, bias)``, with the buffers (and versions) the operands came from."""

    __slots__ = ("kernel", "operands", "watched", "keywords")

    def __init__(self, kernel, operands: tuple, watched: tuple, **keywords) -> None:
        self.kernel, self.operands, self.watched = kernel, operands, watched
        self.keywords = keywords

    def current(self, buffers: dict) -> bool:
        for name, tensor, version in self.watched:
            # an inference-mode buffer has no version: only its replacement is seen
            if buffers.get(name) is not tensor or kernels.tensor_version(tensor) != version:
                return False
        return True

    def run(self, x: Tensor, bias: Tensor | None, *extra) -> Tensor:
        return self.kernel(x, *self.operands, bias, *extra, **self.keywords)


class KernelDispatch(nn.Module):
    """The kernel side of a packed module whose buffers hold codes ``qweight`` (uint8, offset to
    unsigned), ``scale`` and ``zero`` (None when symmetric) on the grid of ``spec``: integer
    kernels for float32 activations on the CPU, and W8A8 on CUDA."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        g = spec.granularity
        #: int8 per-row symmetric codes: the W8A16 / W8A8 kernels
        self.int8_rows = spec.bits == 8 and spec.symmetric and isinstance(g, PerRow)
        #: 8-bit per-row codes with integer zero points: the W8A8 kernel only (zero in int32)
        self.uint8_rows = (
            spec.bits == 8 and not spec.symmetric and not spec.float_zero and isinstance(g, PerRow)
        )
        #: 8-bit per-row codes of either kind: an int8 input can go through the int8 GEMM
        self.int8_gemm = self.int8_rows or self.uint8_rows
        #: the group size of 4-bit codes grouped along the input: the W4A16 kernel
        self.w4_group = (
            g.size if spec.bits == 4 and isinstance(g, PerGroup) and g.along == "input" else None
        )
        self._kernel_calls: dict[bool, _KernelCall] = {}
        self._input_mode: float | str | None = None  # see build_kernel_operands

    def _kernel_ready(self, x: Tensor) -> bool:
        return _KERNELS["on"] and x.dtype is torch.float32 and x.device.type in ("cpu", "cuda")

    def _kernel_call(self, int8_input: bool) -> _KernelCall | None:
        """The kernel and its weight operands, built once and reused while the buffers they were
        made from are unchanged (same tensors, same version): a decode step makes ~200 calls,
        and re-deriving the operands cost more than a small kernel itself. Under
        ``torch.compile`` the operands built eagerly (:meth:`build_kernel_operands`) are used
        unchecked: a compiled graph cannot read tensor versions."""
        call = self._kernel_calls.get(int8_input)
        if torch.compiler.is_compiling():
            if call is None:  # built in the graph: right, but re-derived at every call
                call = self._make_kernel_call(int8_input)
        elif call is None or not call.current(self._buffers):
            call = self._kernel_calls[int8_input] = self._make_kernel_call(int8_input)
        return call if call.kernel is not None else None

    def build_kernel_operands(self) -> None:
        """Derive the kernels' operands (the int8 view of the codes, zero points in code units,
        oneDNN's packed weight, a calibrated input scale as a number) now, outside any compiled
        graph, for :func:`channelwise.deploy.decode.compile_decode`; call it again after writing
        this module's buffers or its input quantizer's scale."""
        for int8_input in (False, True) if self.int8_gemm else (False,):
            self._kernel_calls[int8_input] = self._make_kernel_call(int8_input)
        quantizer = input_quantizer(self)
        self._input_mode = None if quantizer is None else int8_input_scale(quantizer)

    def _make_kernel_call(self, int8_input: bool) -> _KernelCall:
        buffers = self._buffers
        watched = tuple(
            (name, t, kernels.tensor_version(t))
            for name, t in buffers.items()
            if name in _WATCHED and t is not None
        )
        qweight, scale = buffers["qweight"], buffers["scale"]
        if qweight.device.type != "cpu" and not (int8_input and self.int8_gemm):
            return _KernelCall(None, (), watched)  # CUDA: only W8A8 (torch._int_mm) is real
        on_cpu = qweight.device.type == "cpu"  # oneDNN's packed weight, the VNNI kernel: CPU
        int8 = self._int8_codes() if self.int8_gemm else None
        if self.int8_rows:
            if int8_input:
                onednn = on_cpu and kernels.onednn_int8_fast()
                packed = kernels.prepack_int8(int8) if onednn else None
                unsigned = kernels.unsigned_codes(self._uint8_codes()) if on_cpu else None
                return _KernelCall(
                    kernels.w8a8_linear, (int8, scale[:, 0]), watched, w_packed=packed,
                    w_unsigned=unsigned,
                )  # fmt: skip
            return _KernelCall(kernels.w8a16_linear, (int8, scale[:, 0]), watched)
        if self.uint8_rows and int8_input:  # zero z − 128 in int32, as the codes
            zero = buffers["zero"][:, 0].to(torch.int32)
            unsigned = kernels.unsigned_codes(qweight, zero) if on_cpu else None
            return _KernelCall(
                kernels.w8a8_linear, (int8, scale[:, 0]), watched, w_zero=zero - 128,
                w_unsigned=unsigned,
            )  # fmt: skip
        if self.w4_group is not None and not int8_input:
            operands = (qweight, scale, self._code_zero(), self.w4_group)
            return _KernelCall(kernels.w4a16_linear, operands, watched)
        return _KernelCall(None, (), watched)

    def _int8_codes(self) -> Tensor:
        """8-bit codes as the int8 kernels take them (stored offset by 128 as uint8)."""
        return (self._buffers["qweight"] ^ 0x80).view(torch.int8)

    def _uint8_codes(self) -> Tensor:
        """Symmetric 8-bit codes offset by 128, as stored: the small-M W8A8 kernel's weight."""
        return self._buffers["qweight"]

    def _apply(self, fn, *args, **kwargs):
        self._kernel_calls.clear()  # .to()/.cuda() replace the buffers: drop the CPU operands now
        return super()._apply(fn, *args, **kwargs)

    def _code_zero(self) -> Tensor:
        """Zero points in unsigned code units (a symmetric 4-bit code is stored offset by 8). A
        float minimum ``m`` becomes ``−m/s``: the kernel's ``(q − z)·s`` is then ``q·s + m`` up to
        one float32 rounding of ``m``, on top of the kernel's own summation-order difference."""
        if self.zero is None:
            return torch.full_like(self.scale, -self.spec.qmin)
        if self.spec.float_zero:
            return -self.zero / self.scale
        return self.zero.float()

    def _int8_input_mode(self, quantizer: InputQuantizer, x: Tensor) -> float | str | None:
        """:func:`int8_input_scale` where the int8 GEMM can take ``x``, else None. In a compiled
        graph a static scale is the number :meth:`build_kernel_operands` read eagerly."""
        if not self._int8_gemm_ready(x):
            return None
        if torch.compiler.is_compiling() and self._input_mode is not None:
            return self._input_mode
        return int8_input_scale(quantizer)

    def _int8_gemm_ready(self, x: Tensor) -> bool:
        """Whether the int8 GEMM can take ``x``. Inside a compiled graph only the small-M VNNI
        kernel can (decode; oneDNN's int8 linear is not traceable); elsewhere the module
        fake-quantizes ``x`` (the input-quantizer hook) into the weight-only kernel: the same
        products, summed in float instead of int32."""
        if not (self.int8_gemm and self._kernel_ready(x)):
            return False
        if torch.compiler.is_compiling():
            return x.device.type == "cpu" and kernels.small_m_kernel(x.numel() // x.shape[-1])
        return True
