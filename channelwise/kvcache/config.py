"""What a compressed KV cache stores: :class:`KVCacheConfig` (a codec each for keys and values,
the float window, sinks) and the two protocols a KV method plugs in, :class:`KeyTransform` and
:class:`Shrink`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from channelwise.errors import KVCacheError
from channelwise.kvcache.codecs import KVCodec


class KeyTransform(Protocol):
    """An exact, invertible change of one sequence's keys ``(heads, n, head_dim)`` in one layer,
    applied before encoding and undone after decoding. ``positions`` ``(n,)`` are the tokens'
    RoPE positions (a transform that works before RoPE needs them)."""

    def to_stored(self, keys: Tensor, layer: int, positions: Tensor) -> Tensor: ...

    def from_stored(self, keys: Tensor, layer: int, positions: Tensor) -> Tensor: ...


class Shrink(Protocol):
    """Channel shrinking (CSKV): the cache stores low-rank features of the attention input
    instead of the keys and values, and rebuilds them on reading."""

    def features(self, inputs: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """Attention inputs ``(n, hidden)`` → key and value features, each ``(1, n, r)``."""
        ...

    def keys(self, features: Tensor, layer: int, positions: Tensor) -> Tensor:
        """Key features ``(1, n, r)`` → post-RoPE keys ``(heads, n, head_dim)``."""
        ...

    def values(self, features: Tensor, layer: int) -> Tensor:
        """Value features ``(1, n, r)`` → values ``(heads, n, head_dim)``."""
        ...


@dataclass(frozen=True)
class KVCacheConfig:
    """What a compressed cache stores: a codec each for keys and values, and what stays float.

    ``residual``: the newest tokens stay in float until this many have accumulated, then they
    are encoded together (a multiple of both codecs' ``token_multiple``; 0 encodes every token
    on arrival, which needs per-token codecs). ``key_transform``: applied to keys as they are
    encoded and undone as they are decoded. ``sinks``: in a sequence's first forward (its
    prefill), the tokens holding the ``sinks`` largest ``|x|`` of the layer's input (tokens ×
    channels) stay in float — RotateKV's attention sinks (needs per-token codecs). ``shrink``:
    the codecs store low-rank features of the attention input instead of the keys and values
    (CSKV); the residual window keeps both until it flushes.
    """

    key_codec: KVCodec
    value_codec: KVCodec
    residual: int = 0
    key_transform: KeyTransform | None = field(default=None, compare=False)
    sinks: int = 0
    shrink: Shrink | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.shrink is not None and (self.key_transform is not None or self.sinks):
            raise KVCacheError("channel shrinking does not combine with a key transform or sinks")
        if self.residual < 0:
            raise KVCacheError(f"residual must be ≥ 0, got {self.residual}")
        if self.sinks < 0:
            raise KVCacheError(f"sinks must be ≥ 0, got {self.sinks}")
        for name, codec in (("key", self.key_codec), ("value", self.value_codec)):
            unit = codec.token_multiple
            if self.residual == 0 and unit > 1:
                raise KVCacheError(
                    f"the {name} codec groups {unit} tokens; set residual to a multiple of {unit}"
                )
            if self.residual % unit:
                raise KVCacheError(
                    f"residual {self.residual} is not a multiple of the {name} codec's "
                    f"{unit}-token groups"
                )
            if self.sinks and not codec.per_token:
                raise KVCacheError(
                    f"attention sinks leave single tokens out of the codec; the {name} codec "
                    "groups tokens (use a per-token codec, or sinks: 0)"
                )

    @property
    def flush_unit(self) -> int:
        return max(self.residual, 1)
