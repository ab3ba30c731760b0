"""Real integer kernels behind packed linears (CPU: :mod:`channelwise.kernels.cpu`)."""

from channelwise.kernels.cpu import (
    KernelInputError,
    dequantize_w4,
    dequantize_w8,
    kernel_available,
    prepack_int8,
    quantize_per_token,
    quantize_static,
    tensor_version,
    unpack_int4,
    unsigned_codes,
    w4a16_linear,
    w4a16_reference,
    w8a8_linear,
    w8a8_reference,
    w8a16_linear,
    w8a16_reference,
)

__all__ = [
    "KernelInputError",
    "dequantize_w4",
    "dequantize_w8",
    "kernel_available",
    "prepack_int8",
    "quantize_per_token",
    "quantize_static",
    "tensor_version",
    "unpack_int4",
    "unsigned_codes",
    "w4a16_linear",
    "w4a16_reference",
    "w8a8_linear",
    "w8a8_reference",
    "w8a16_linear",
    "w8a16_reference",
]
