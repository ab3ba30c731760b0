"""One decoder layer's compressed keys and values, stored per sequence of the batch.

Each sequence is stored from its first real token (pads are counted, never stored, and read back
as zeros) and keeps:

* an :class:`~channelwise.kvcache.codecs.Encoded` chunk — the compressed tokens, really packed;
* a float *residual* of the newest tokens, flushed into the codec once ``residual`` of them have
  accumulated (KIVI's full-precision window; with ``residual=0`` every token is encoded at once);
* optionally *sink* tokens kept in float (RotateKV's attention sinks).

:meth:`CompressedLayer.update` stores the new tokens, then returns what the layer now holds,
decoded: every token a query attends to has gone through the storage policy (the new tokens too,
once flushed).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin

from channelwise.errors import KVCacheError
from channelwise.kvcache.codecs import Encoded
from channelwise.kvcache.config import KVCacheConfig

if TYPE_CHECKING:
    from channelwise.kvcache.cache import CompressedCache


def _nbytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class _Sequence:
    """One batch row's storage in one layer: its tokens in order are the encoded stream and the
    float residual (newest), with float sink tokens at ``sink_index`` among them."""

    def __init__(self) -> None:
        self.pads = 0
        self.first_position: int | None = None
        self.keys: Encoded | None = None
        self.values: Encoded | None = None
        self.residual_keys: Tensor | None = None
        self.residual_values: Tensor | None = None
        self.sink_index: Tensor | None = None  # token indices within the sequence, ascending
        self.sink_keys: Tensor | None = None
        self.sink_values: Tensor | None = None
        self.residual_features: tuple[Tensor, Tensor] | None = None

    @property
    def encoded(self) -> int:
        return 0 if self.keys is None else self.keys.tokens

    @property
    def n_sinks(self) -> int:
        return 0 if self.sink_index is None else int(self.sink_index.numel())

    @property
    def stored(self) -> int:
        residual = 0 if self.residual_keys is None else self.residual_keys.shape[1]
        return self.encoded + residual + self.n_sinks

    def _stream_positions(self, start: int, n: int, device) -> Tensor:
        """RoPE positions of stream tokens ``start … start + n − 1`` (sinks skipped)."""
        total = start + n + self.n_sinks
        index = torch.arange(total, device=device)
        if self.sink_index is not None:
            keep = torch.ones(total, dtype=torch.bool, device=device)
            keep[self.sink_index.to(device)] = False
            index = index[keep]
        return index[start : start + n] + (self.first_position or 0)

    def append(
        self,
        keys: Tensor,
        values: Tensor,
        config: KVCacheConfig,
        layer: int,
        first_position: int,
        sink_scores: Tensor | None,
        features: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """Store real tokens ``(heads, n, head_dim)`` and flush whole units of the residual.

        ``first_position``: the RoPE position of the first of them; ``sink_scores``
        ``(n, channels)``: the layer input of these tokens, to pick sinks from (prefill only);
        ``features``: their key and value features ``(1, n, r)`` when the cache shrinks.
        """
        if self.first_position is None:
            self.first_position = first_position
        elif first_position != self.first_position + self.stored:
            raise KVCacheError(
                f"a sequence's positions must be contiguous: the cache holds positions "
                f"{self.first_position}…{self.first_position + self.stored - 1}, the next token "
                f"came at {first_position}"
            )
        if config.sinks and self.stored == 0 and sink_scores is not None:
            keys, values = self._keep_sinks(keys, values, sink_scores, config.sinks)
        if self.residual_keys is not None:
            keys = torch.cat([self.residual_keys, keys], dim=1)
            values = torch.cat([self.residual_values, values], dim=1)
        if config.shrink is not None:
            if features is None:
                raise KVCacheError(
                    "a shrinking cache needs the attention inputs; create it with make_cache"
                )
            if self.residual_features is not None:
                features = tuple(
                    torch.cat([old, new], dim=1)
                    for old, new in zip(self.residual_features, features, strict=True)
                )
        unit = config.flush_unit
        n_flush = (keys.shape[1] // unit) * unit
        if n_flush and config.shrink is not None:
            fk, fv = features
            self.keys = _cat(self.keys, config.key_codec.encode(fk[:, :n_flush]))
            self.values = _cat(self.values, config.value_codec.encode(fv[:, :n_flush]))
        elif n_flush:
            flushed = keys[:, :n_flush]
            if config.key_transform is not None:
                positions = self._stream_positions(self.encoded, n_flush, keys.device)
                flushed = config.key_transform.to_stored(flushed, layer, positions)
            self.keys = _cat(self.keys, config.key_codec.encode(flushed))
            self.values = _cat(self.values, config.value_codec.encode(values[:, :n_flush]))
        rest = keys.shape[1] - n_flush
        self.residual_keys = keys[:, n_flush:].clone() if rest else None
        self.residual_values = values[:, n_flush:].clone() if rest else None
        if config.shrink is not None:
            self.residual_features = (
                tuple(f[:, n_flush:].clone() for f in features) if rest else None
            )

    def _keep_sinks(self, keys: Tensor, values: Tensor, scores: Tensor, k: int):
        """Move the tokens holding the ``k`` largest ``|scores|`` out of the stream."""
        flat = scores.abs().float().reshape(-1)
        top = flat.topk(min(k, flat.numel())).indices // scores.shape[-1]
        index = torch.unique(top)  # sorted
        keep = torch.ones(keys.shape[1], dtype=torch.bool, device=keys.device)
        keep[index] = False
        self.sink_index = index
        self.sink_keys = keys[:, index].clone()
        self.sink_values = values[:, index].clone()
        return keys[:, keep], values[:, keep]

    def read(self, config: KVCacheConfig, shape: tuple[int, int, int], dtype, device, layer: int):
        """Keys and values ``(heads, pads + stored, head_dim)``, pads as zeros."""
        heads, _, head_dim = shape
        parts_k, parts_v = [], []
        if self.keys is not None:
            keys = config.key_codec.decode(self.keys, dtype)
            values = config.value_codec.decode(self.values, dtype)
            if config.shrink is not None:
                positions = self._stream_positions(0, self.encoded, device)
                keys = config.shrink.keys(keys, layer, positions).to(dtype)
                values = config.shrink.values(values, layer).to(dtype)
            elif config.key_transform is not None:
                positions = self._stream_positions(0, self.encoded, device)
                keys = config.key_transform.from_stored(keys, layer, positions)
            parts_k.append(keys)
            parts_v.append(values)
        if self.residual_keys is not None:
            parts_k.append(self.residual_keys.to(dtype))
            parts_v.append(self.residual_values.to(dtype))
        empty = torch.zeros(heads, 0, head_dim, dtype=dtype, device=device)
        keys = torch.cat(parts_k, dim=1) if parts_k else empty
        values = torch.cat(parts_v, dim=1) if parts_v else empty
        if self.n_sinks:
            keys = self._with_sinks(keys, self.sink_keys.to(dtype))
            values = self._with_sinks(values, self.sink_values.to(dtype))
        if self.pads:
            zeros = torch.zeros(heads, self.pads, head_dim, dtype=dtype, device=device)
            keys, values = torch.cat([zeros, keys], dim=1), torch.cat([zeros, values], dim=1)
        return keys, values

    def _with_sinks(self, stream: Tensor, sinks: Tensor) -> Tensor:
        total = stream.shape[1] + sinks.shape[1]
        out = stream.new_empty(stream.shape[0], total, stream.shape[2])
        is_stream = torch.ones(total, dtype=torch.bool, device=stream.device)
        is_stream[self.sink_index.to(stream.device)] = False
        out[:, is_stream] = stream
        out[:, ~is_stream] = sinks
        return out

    def nbytes(self) -> int:
        total = sum(0 if enc is None else enc.nbytes for enc in (self.keys, self.values))
        for t in (self.residual_keys, self.residual_values, self.sink_keys, self.sink_values):
            total += _nbytes(t)
        for t in self.residual_features or ():
            total += _nbytes(t)
        return total + _nbytes(self.sink_index)


def _cat(a: Encoded | None, b: Encoded) -> Encoded:
    return b if a is None else a.cat(b)


class CompressedLayer(CacheLayerMixin):
    """One decoder layer's compressed keys and values, a storage per sequence."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, config: KVCacheConfig, owner: CompressedCache, index: int) -> None:
        super().__init__()
        self.config = config
        self.owner = owner
        self.index = index
        self.columns = 0
        self.sequences: list[_Sequence] = []

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.sequences = [_Sequence() for _ in range(key_states.shape[0])]
        self.is_initialized = True

    def update(
        self, key_states: Tensor, value_states: Tensor, *args, **kwargs
    ) -> tuple[Tensor, Tensor]:
        """Store ``(batch, kv_heads, new, head_dim)`` keys/values; return all held, decoded."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, new, head_dim = key_states.shape
        if batch != len(self.sequences):
            raise KVCacheError(
                f"this cache holds {len(self.sequences)} sequences; the forward has {batch}"
            )
        real = self.owner.real_tokens(self.columns, new, batch, key_states.device)
        inputs = self.owner.layer_inputs.get(self.index)
        shrink = self.config.shrink
        attn_inputs = self.owner.attention_inputs.get(self.index) if shrink is not None else None
        if shrink is not None and attn_inputs is None:
            raise KVCacheError(
                "a shrinking cache reads the attention inputs through hooks; create it with "
                "make_cache(model)"
            )
        for b, seq in enumerate(self.sequences):
            keep = real[b]
            n_real = int(keep.sum())
            if n_real < new:
                if seq.stored or not bool((keep[new - n_real :]).all()):
                    raise KVCacheError(
                        "compressed caches support left padding only (pads before a sequence's "
                        "first token); found a pad after real tokens"
                    )
                seq.pads += new - n_real
            if n_real:
                start = new - n_real
                seq.append(
                    key_states[b, :, start:],
                    value_states[b, :, start:],
                    self.config,
                    self.index,
                    self.owner.position(b, self.columns, start),
                    None if inputs is None else inputs[b, start:],
                    None if shrink is None else shrink.features(attn_inputs[b, start:], self.index),
                )
        self.owner.layer_inputs.pop(self.index, None)
        self.owner.attention_inputs.pop(self.index, None)
        self.columns += new
        read = [
            seq.read(
                self.config, (heads, 0, head_dim), key_states.dtype, key_states.device, self.index
            )
            for seq in self.sequences
        ]
        return torch.stack([k for k, _ in read]), torch.stack([v for _, v in read])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.columns + query_length, 0

    def get_seq_length(self) -> int:
        return self.columns

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.columns = 0
        self.sequences = []
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        self.sequences = [copy.deepcopy(self.sequences[int(i)]) for i in indices.tolist()]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.sequences = [copy.deepcopy(seq) for seq in self.sequences for _ in range(repeats)]

    def crop(self, tokens_to_remove: int) -> None:
        raise KVCacheError("a compressed cache cannot drop tokens (crop); start a new cache")

    def nbytes(self) -> int:
        return sum(seq.nbytes() for seq in self.sequences)

    def stored_tokens(self) -> int:
        return sum(seq.stored for seq in self.sequences)
