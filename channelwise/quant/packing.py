"""Bit-packing of integer codes into bytes: the one layout every packed format of channelwise uses.

Layout
------
Codes are *unsigned* integers ``0 … 2^b − 1`` (``1 ≤ b ≤ 8``); a symmetric quantizer's signed
codes ``−2^(b−1) … 2^(b−1) − 1`` are stored with the offset ``2^(b−1)`` (:func:`to_unsigned`,
:func:`to_signed`). Codes are packed along the LAST dimension into ``torch.uint8``; every row
(every index of the leading dimensions) is one little-endian bit stream:

* code ``i`` of a row occupies stream bits ``b·i … b·i + b − 1``, its least significant bit first;
* stream bit ``j`` is bit ``j mod 8`` (``0`` = least significant) of byte ``j // 8``;
* a row of ``n`` codes takes ``ceil(n·b / 8)`` bytes (:func:`packed_size`); the padding bits at
  the end of its last byte are zero. Rows never share a byte.

So at 8 bits a byte is a code; at 4 bits byte ``k`` holds code ``2k`` in its low nibble and code
``2k + 1`` in its high nibble; at 2 bits code ``4k + i`` sits at bits ``2i … 2i + 1`` of byte
``k``; at 1 bit code ``8k + i`` is bit ``i`` of byte ``k``. At 3, 5, 6 and 7 bits a code may
straddle two bytes; every 8 codes fill exactly ``b`` bytes.

Why little-endian order
-----------------------
Putting the earlier code in the less significant bits makes a row's bytes, read as one
little-endian integer, equal ``Σ code_i · 2^(b·i)``: unpacking is "shift right by ``b·i``, mask",
with no per-width special case, and the bytes of a group of codes read as a wider little-endian
word (int32, int64) hold the same codes in the same order. It is also the order within a byte of
GGUF's 4-bit blocks (low nibble = the earlier code) and of int4 kernels such as those behind
compressed-tensors' ``pack_to_int32`` (which fills int32 words from the least significant bit,
offset codes included) — the exporters should still verify against those packages.

How GGUF differs (checked in ``gguf/quants.py`` of gguf 0.19, ``Q4_0`` / ``Q4_1``)
--------------------------------------------------------------------------------------
A ``Q4_0`` block covers 32 weights: a float16 scale ``d`` (``Q4_1``: ``d`` then a float16
minimum ``m``) followed by 16 bytes ``qs``. Byte ``j`` of ``qs`` holds weight ``j`` in its low
nibble and weight ``j + 16`` in its high nibble — the first half of the block in the low nibbles,
the second half in the high nibbles — whereas here byte ``j`` holds codes ``2j`` and ``2j + 1``.
``Q4_0`` codes are offset by 8 like ours (value ``d·(q − 8)``); ``Q4_1`` codes are unsigned
(value ``d·q + m``). A GGUF exporter must therefore re-order nibbles per 32-block:
``qs[j] = c[j] | c[j + 16] << 4`` for the codes ``c`` of :func:`unpack_codes`. ``Q8_0`` is not
offset at all: it stores int8 two's complement, i.e. our 8-bit byte XOR ``0x80``.

Implementation
--------------
Pure torch ops, no Python loop over elements, so CUDA tensors work too. Widths 1, 2, 4 and 8
divide a byte: the codes are padded to a multiple of ``8 // b`` and OR-ed together at their
shifts. Widths 3, 5, 6 and 7 go through 64-bit words: 8 codes make ``8·b ≤ 56`` bits, exactly
``b`` bytes, assembled as ``Σ code_i << (b·i)`` in int64 and cut into bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from channelwise.errors import PackingError

_BYTE_ALIGNED = (1, 2, 4, 8)
# Integer dtypes whose min/max torch implements; other unsigned widths are widened first.
_NATIVE_INT = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def packed_size(n: int, bits: int) -> int:
    """Bytes taken by a row of ``n`` codes of ``bits`` bits: ``ceil(n·bits / 8)``."""
    _check_bits(bits)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise PackingError(f"the number of codes must be a non-negative integer, got {n!r}")
    return (n * bits + 7) // 8


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned integer ``codes`` ``(..., n)`` into ``uint8`` ``(..., ceil(n·bits/8))``.

    ``codes`` may have any integer dtype; every value must lie in ``0 … 2^bits − 1`` (convert
    signed codes with :func:`to_unsigned` first). The result is on ``codes``' device; at 8 bits
    it may share memory with ``codes`` (it is ``codes`` itself when that is contiguous uint8).
    """
    _check_bits(bits)
    codes = _as_codes(codes, bits, lo=0, hi=(1 << bits) - 1, what="codes")
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if bits in _BYTE_ALIGNED:
        per_byte = 8 // bits
        groups = _pad_last(codes.to(torch.uint8), -n % per_byte)
        groups = groups.reshape(*lead, -(-n // per_byte), per_byte)
        packed = groups[..., 0].clone()
        for i in range(1, per_byte):
            packed |= groups[..., i] << (bits * i)
        return packed
    n_words = -(-n // 8)
    words = _pad_last(codes.to(torch.int64), n_words * 8 - n).reshape(*lead, n_words, 8)
    word = words[..., 0].clone()
    for i in range(1, 8):
        word |= words[..., i] << (bits * i)
    packed = torch.stack([(word >> (8 * j)) & 0xFF for j in range(bits)], dim=-1)
    return (
        packed.to(torch.uint8)
        .reshape(*lead, n_words * bits)[..., : packed_size(n, bits)]
        .contiguous()
    )


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_codes`: ``uint8`` ``(..., ceil(n·bits/8))`` → codes ``(..., n)``.

    The codes come back as ``torch.uint8`` (enough for any width ≤ 8) on ``packed``'s device;
    padding bits are ignored. At 8 bits the result may share memory with ``packed``.
    """
    expected = packed_size(n, bits)
    if not isinstance(packed, Tensor):
        raise PackingError(f"packed codes must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        raise PackingError(f"packed codes must be torch.uint8, got {packed.dtype}")
    if packed.dim() == 0 or packed.shape[-1] != expected:
        raise PackingError(
            f"packed codes of shape {tuple(packed.shape)} cannot hold {n} codes of {bits} bits: "
            f"the last dimension must be ceil({n}·{bits}/8) = {expected}"
        )
    lead = packed.shape[:-1]
    mask = (1 << bits) - 1
    if bits == 8:
        return packed.contiguous()
    if bits in _BYTE_ALIGNED:
        per_byte = 8 // bits
        codes = torch.stack([(packed >> (bits * i)) & mask for i in range(per_byte)], dim=-1)
        return codes.reshape(*lead, expected * per_byte)[..., :n].contiguous()
    n_words = -(-n // 8)
    words = _pad_last(packed.to(torch.int64), n_words * bits - expected)
    words = words.reshape(*lead, n_words, bits)
    word = words[..., 0].clone()
    for j in range(1, bits):
        word |= words[..., j] << (8 * j)
    codes = torch.stack([(word >> (bits * i)) & mask for i in range(8)], dim=-1)
    return codes.to(torch.uint8).reshape(*lead, n_words * 8)[..., :n].contiguous()


def to_unsigned(codes: Tensor, bits: int) -> Tensor:
    """Signed codes in ``[−2^(bits−1), 2^(bits−1) − 1]`` → ``codes + 2^(bits−1)`` as ``uint8``.

    Shape preserved; this is how a symmetric quantizer's int8 codes are stored.
    """
    _check_bits(bits)
    half = 1 << (bits - 1)
    codes = _as_codes(codes, bits, lo=-half, hi=half - 1, what="signed codes")
    return (codes.to(torch.int16) + half).to(torch.uint8)


def to_signed(codes: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`to_unsigned`: codes in ``[0, 2^bits − 1]`` → ``codes − 2^(bits−1)``.

    Shape preserved; returns ``int8``.
    """
    _check_bits(bits)
    codes = _as_codes(codes, bits, lo=0, hi=(1 << bits) - 1, what="unsigned codes")
    return (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise PackingError(f"bits must be an integer in 1..8, got {bits!r}")


def _as_codes(codes: Tensor, bits: int, lo: int, hi: int, what: str) -> Tensor:
    """``codes`` checked to be an integer tensor of ≥ 1 dimension with values in ``[lo, hi]``."""
    if not isinstance(codes, Tensor):
        raise PackingError(f"{what} must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype == torch.bool or codes.dtype.is_floating_point or codes.dtype.is_complex:
        raise PackingError(
            f"{what} must have an integer dtype, got {codes.dtype}; round and convert them "
            "first (e.g. channelwise.quant.quantize returns integer codes)"
        )
    if codes.dim() == 0:
        raise PackingError(f"{what} must have at least one dimension (codes are packed along it)")
    if codes.dtype not in _NATIVE_INT:
        codes = codes.to(torch.int64)
    if codes.numel() > 0:
        low, high = int(codes.min()), int(codes.max())
        if low < lo or high > hi:
            raise PackingError(
                f"{what} must lie in [{lo}, {hi}] for {bits} bits, got min {low} and max {high}"
            )
    return codes


def _pad_last(x: Tensor, pad: int) -> Tensor:
    """``x`` with ``pad`` zeros appended along its last dimension."""
    if pad == 0:
        return x
    return torch.cat([x, x.new_zeros(*x.shape[:-1], pad)], dim=-1)
