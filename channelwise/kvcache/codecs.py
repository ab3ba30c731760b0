"""Codecs that store a KV-cache chunk as packed integer codes and read it back.

A chunk is one sequence's keys or values for one layer, ``(heads, tokens, head_dim)``. Every
codec works on the 2-D view ``(tokens, heads·head_dim)`` — a row is one token's vector over all
KV heads — and returns an :class:`Encoded` whose tensors are what the cache really holds: codes
packed at their bit width (``quant.packing``), scales and minimums in float16. Encoded chunks of
the same codec concatenate along tokens, so a cache keeps one growing ``Encoded`` per sequence.

* :class:`GroupQuantCodec` — integer quantization through ``quant.core`` with a float16 grid.
  ``axis="token"`` puts ``group`` consecutive tokens of one channel in a block (KIVI's keys,
  per channel); ``axis="channel"`` puts ``group`` consecutive channels of one token in a block
  (KIVI's values and RotateKV's K and V, per token).
* :class:`BFPCodec` — block floating point (K-sort, arXiv 2403.20137): ``block`` consecutive
  channels of a token share one 8-bit exponent; each value keeps a sign-magnitude mantissa.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from channelwise.errors import KVCacheError, NonFiniteError
from channelwise.quant.core import QParams, QuantSpec, compute_qparams, dequantize, quantize
from channelwise.quant.granularity import PerGroup
from channelwise.quant.packing import pack_codes, unpack_codes


@dataclass
class Encoded:
    """A compressed chunk: named tensors (concatenable along dim 0) and its logical shape."""

    tensors: dict[str, Tensor]
    heads: int
    tokens: int
    head_dim: int

    @property
    def nbytes(self) -> int:
        """Bytes held by the chunk's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def cat(self, other: Encoded) -> Encoded:
        """This chunk followed by ``other`` along tokens (same codec, same heads)."""
        return Encoded(
            {k: torch.cat([v, other.tensors[k]]) for k, v in self.tensors.items()},
            self.heads,
            self.tokens + other.tokens,
            self.head_dim,
        )

    def select(self, index: Tensor) -> Encoded:
        """Rows of every tensor at ``index`` (per-token codecs only; see ``KVCodec.per_token``)."""
        return Encoded(
            {k: v[index] for k, v in self.tensors.items()},
            self.heads,
            int(index.numel()),
            self.head_dim,
        )


def _as_rows(x: Tensor) -> Tensor:
    """``(heads, tokens, head_dim)`` → ``(tokens, heads·head_dim)``."""
    if x.ndim != 3:
        raise KVCacheError(f"a KV chunk is (heads, tokens, head_dim), got shape {tuple(x.shape)}")
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _from_rows(rows: Tensor, heads: int, head_dim: int) -> Tensor:
    return rows.reshape(rows.shape[0], heads, head_dim).transpose(0, 1)


class KVCodec:
    """How a cache stores a chunk. ``token_multiple``: chunks must hold a multiple of this many
    tokens (a codec grouping tokens can only encode whole groups); ``per_token``: every token's
    storage is independent of the others (so single tokens can be left out, e.g. sinks)."""

    token_multiple: int = 1
    per_token: bool = True

    def encode(self, x: Tensor) -> Encoded:
        raise NotImplementedError

    def decode(self, enc: Encoded, dtype: torch.dtype = torch.float32) -> Tensor:
        raise NotImplementedError

    def bits_per_value(self, heads: int, head_dim: int) -> float:
        """Average stored bits per cached value (codes plus metadata), for labels and checks."""
        x = torch.zeros(heads, self.token_multiple, head_dim)
        return 8 * self.encode(x).nbytes / x.numel()


@dataclass(frozen=True)
class GroupQuantCodec(KVCodec):
    """Asymmetric ``bits``-bit integer codes, float minimum, float16 scales (KIVI's quantizer).

    ``axis="token"``: one (scale, minimum) per channel per ``group`` tokens; ``axis="channel"``:
    one per token per ``group`` channels of the token's ``heads·head_dim`` vector. ``clip_ratio``
    shrinks each block's range (RotateKV clips 2-bit ranges by 0.8).
    """

    bits: int
    group: int
    axis: Literal["token", "channel"]
    clip_ratio: float = 1.0
    spec: QuantSpec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.axis not in ("token", "channel"):
            raise KVCacheError(f"axis must be 'token' or 'channel', got {self.axis!r}")
        along = "output" if self.axis == "token" else "input"
        spec = QuantSpec(
            bits=self.bits,
            symmetric=False,
            granularity=PerGroup(self.group, along),
            clip_ratio=self.clip_ratio,
            scale_dtype="float16",
            zero_point="float",
        )
        object.__setattr__(self, "spec", spec)

    @property
    def token_multiple(self) -> int:  # type: ignore[override]
        return self.group if self.axis == "token" else 1

    @property
    def per_token(self) -> bool:  # type: ignore[override]
        return self.axis == "channel"

    def encode(self, x: Tensor) -> Encoded:
        heads, tokens, head_dim = x.shape
        rows = _as_rows(x)
        if self.axis == "channel" and rows.shape[1] % self.group:
            raise KVCacheError(
                f"a group of {self.group} channels does not divide the {rows.shape[1]} "
                f"channels of a token ({heads} KV heads × {head_dim})"
            )
        if tokens % self.token_multiple:
            raise KVCacheError(
                f"per-channel key groups of {self.group} tokens need a multiple of "
                f"{self.group} tokens, got {tokens}"
            )
        qparams = compute_qparams(rows, self.spec)
        codes = quantize(rows, qparams, self.spec)
        return Encoded(
            {
                "codes": pack_codes(codes, self.bits),
                "scale": qparams.scale.half(),
                "minimum": qparams.zero_point.half(),
            },
            heads,
            tokens,
            head_dim,
        )

    def decode(self, enc: Encoded, dtype: torch.dtype = torch.float32) -> Tensor:
        t = enc.tensors
        codes = unpack_codes(t["codes"], self.bits, enc.heads * enc.head_dim)
        qparams = QParams(t["scale"].float(), t["minimum"].float())
        rows = dequantize(codes, qparams, self.spec, dtype=dtype)
        return _from_rows(rows, enc.heads, enc.head_dim)


class Float16Codec(KVCodec):
    """Stores the chunk in float16 (e.g. CSKV's shrunk features without quantization)."""

    def encode(self, x: Tensor) -> Encoded:
        heads, tokens, head_dim = x.shape
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteError("KV cache input contains NaN/inf values")
        return Encoded({"x": _as_rows(x).half()}, heads, tokens, head_dim)

    def decode(self, enc: Encoded, dtype: torch.dtype = torch.float32) -> Tensor:
        return _from_rows(enc.tensors["x"].to(dtype), enc.heads, enc.head_dim)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Float16Codec)

    def __hash__(self) -> int:
        return hash(Float16Codec)


EXPONENT_BIAS = 127
ZERO_EXPONENT = -EXPONENT_BIAS  # stored byte 0: an all-zero block


@dataclass(frozen=True)
class BFPCodec(KVCodec):
    """Block floating point: ``block`` channels share an 8-bit exponent ``k``; each value is a
    ``mantissa_bits``-bit sign-magnitude integer ``m`` (1 sign bit), so ``x ≈ ±m·2^k``.

    ``k`` is the smallest integer with ``round(max|x| / 2^k) ≤ 2^(mantissa_bits−1) − 1``: the block
    maximum never saturates. Stored as ``k + 127`` in a uint8 (byte 0 marks an all-zero block);
    the paper fixes only "shared exponent from the block max"; this rounding rule is ours.
    """

    block: int = 32
    mantissa_bits: int = 4

    def __post_init__(self) -> None:
        if not 2 <= self.mantissa_bits <= 8:
            raise KVCacheError(f"mantissa_bits must be in 2..8, got {self.mantissa_bits}")
        if self.block < 1:
            raise KVCacheError(f"block must be positive, got {self.block}")

    @property
    def max_magnitude(self) -> int:
        return 2 ** (self.mantissa_bits - 1) - 1

    def encode(self, x: Tensor) -> Encoded:
        heads, tokens, head_dim = x.shape
        rows = _as_rows(x).float()
        channels = rows.shape[1]
        if channels % self.block:
            raise KVCacheError(
                f"a block of {self.block} channels does not divide the {channels} channels of a "
                f"token ({heads} KV heads × {head_dim})"
            )
        if not bool(torch.isfinite(rows).all()):
            raise NonFiniteError("KV cache input contains NaN/inf values")
        blocks = rows.reshape(tokens, channels // self.block, self.block)
        amax = blocks.abs().amax(dim=-1)
        exponent = block_exponent(amax, self.max_magnitude)
        step = torch.exp2(exponent.float())[..., None]
        magnitude = torch.clamp(torch.round(blocks.abs() / step), 0, self.max_magnitude)
        sign = (blocks < 0) & (magnitude > 0)
        codes = magnitude.to(torch.uint8) | (sign.to(torch.uint8) << (self.mantissa_bits - 1))
        return Encoded(
            {
                "codes": pack_codes(codes.reshape(tokens, channels), self.mantissa_bits),
                "exponent": (exponent + EXPONENT_BIAS).to(torch.uint8),
            },
            heads,
            tokens,
            head_dim,
        )

    def decode(self, enc: Encoded, dtype: torch.dtype = torch.float32) -> Tensor:
        channels = enc.heads * enc.head_dim
        codes = unpack_codes(enc.tensors["codes"], self.mantissa_bits, channels)
        codes = codes.reshape(enc.tokens, channels // self.block, self.block).to(torch.int16)
        sign_bit = 1 << (self.mantissa_bits - 1)
        magnitude = (codes & (sign_bit - 1)).float()
        value = torch.where(codes & sign_bit > 0, -magnitude, magnitude)
        exponent = enc.tensors["exponent"].to(torch.int16) - EXPONENT_BIAS
        rows = (value * torch.exp2(exponent.float())[..., None]).reshape(enc.tokens, channels)
        return _from_rows(rows.to(dtype), enc.heads, enc.head_dim)


def block_exponent(amax: Tensor, max_magnitude: int) -> Tensor:
    """Smallest integer ``k`` with ``round(amax / 2^k) ≤ max_magnitude`` (int16), per block;
    ``ZERO_EXPONENT`` where ``amax`` is 0. Clamped to what a biased uint8 holds."""
    limit = max_magnitude + 0.5  # round-half-to-even: amax/2^k < limit keeps the top code in range
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    k = torch.floor(torch.log2(safe / limit)) + 1
    # log2 is not exact near powers of two: settle k exactly with one check either way
    k = torch.where(safe / torch.exp2(k) >= limit, k + 1, k)
    k = torch.where(safe / torch.exp2(k - 1) < limit, k - 1, k)
    k = torch.clamp(k, ZERO_EXPONENT + 1, 255 - EXPONENT_BIAS)
    return torch.where(amax > 0, k, torch.full_like(k, ZERO_EXPONENT)).to(torch.int16)


def codec_nbytes(codec: KVCodec, heads: int, tokens: int, head_dim: int) -> int:
    """Bytes ``codec`` holds for ``tokens`` tokens (a multiple of its ``token_multiple``)."""
    n = math.ceil(tokens / codec.token_multiple) * codec.token_multiple
    return codec.encode(torch.zeros(heads, n, head_dim)).nbytes
