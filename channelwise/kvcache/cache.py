"""A compressed KV cache behind transformers' ``Cache`` API.

``make_cache(model, config)`` returns a :class:`CompressedCache`; pass it as
``past_key_values`` to ``model.generate(...)`` or to a plain forward and the model reads its keys
and values through it unchanged. Its layers (:mod:`channelwise.kvcache.layer`) store what the
:class:`~channelwise.kvcache.config.KVCacheConfig` says; ``update`` stores the new tokens, then
returns what the cache now holds, decoded.

**Batching and padding.** Every sequence is stored on its own, starting at its first real token,
so a sequence's codes — and hence its outputs — do not depend on what else is in the batch
(KIVI groups tokens per channel: with shared storage, pad tokens and other sequences' offsets
would change the groups). Padding must be on the left, as ``generate`` pads decoder-only models;
the cache learns it from the ``attention_mask`` of each forward through a pre-hook that
``make_cache`` installs on the model. Pad positions are never stored; they read back as zeros
(the mask hides them).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache

from channelwise.adapters import adapter_for
from channelwise.errors import KVCacheError
from channelwise.kvcache.config import KeyTransform, KVCacheConfig, Shrink
from channelwise.kvcache.layer import CompressedLayer
from channelwise.state import KV_CONFIG_ATTR

__all__ = [
    "KV_CONFIG_ATTR",
    "CompressedCache",
    "CompressedLayer",
    "KVCacheConfig",
    "KeyTransform",
    "Shrink",
    "kv_geometry",
    "make_cache",
]

_HOOK_ATTR = "_channelwise_kv_hook"


class CompressedCache(Cache):
    """A transformers ``Cache`` whose layers store keys and values compressed."""

    def __init__(self, config: KVCacheConfig, num_layers: int, kv_heads: int, head_dim: int):
        super().__init__(layers=[CompressedLayer(config, self, i) for i in range(num_layers)])
        self.config = config
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self._mask: Tensor | None = None
        self._positions: Tensor | None = None
        self.layer_inputs: dict[int, Tensor] = {}  # decoder-layer inputs, for sinks
        self.attention_inputs: dict[int, Tensor] = {}  # attention inputs, for shrinking

    def begin_forward(
        self, attention_mask: Tensor | None, position_ids: Tensor | None = None
    ) -> None:
        """Record the forward's 2-D ``attention_mask`` ``(batch, past + new)`` (1 = real) and
        ``position_ids`` ``(batch or 1, new)`` (``None``: positions count columns)."""
        if attention_mask is not None and attention_mask.ndim != 2:
            raise KVCacheError(
                "a compressed cache needs the 2-D attention_mask (batch, tokens) to tell pads "
                f"from tokens, got shape {tuple(attention_mask.shape)}"
            )
        self._mask = None if attention_mask is None else attention_mask.bool()
        self._positions = position_ids
        self.layer_inputs = {}
        self.attention_inputs = {}

    def position(self, row: int, past: int, column: int) -> int:
        """RoPE position of the forward's new column ``column`` in batch row ``row``."""
        if self._positions is None:
            return past + column
        return int(self._positions[row if self._positions.shape[0] > 1 else 0, column])

    def real_tokens(self, past: int, new: int, batch: int, device) -> Tensor:
        """``(batch, new)`` bool: which of the forward's new columns are real tokens."""
        if self._mask is None:
            return torch.ones(batch, new, dtype=torch.bool, device=device)
        if self._mask.shape != (batch, past + new):
            raise KVCacheError(
                f"attention_mask has shape {tuple(self._mask.shape)}; a forward of {new} tokens "
                f"on {past} cached ones needs ({batch}, {past + new})"
            )
        return self._mask[:, past:].to(device)

    def nbytes(self) -> int:
        """Bytes the cache holds: packed codes, their metadata and the float windows."""
        return sum(layer.nbytes() for layer in self.layers)

    def float16_nbytes(self) -> int:
        """What a float16 cache of the same tokens would hold (keys and values)."""
        tokens = sum(layer.stored_tokens() for layer in self.layers)
        return 2 * 2 * tokens * self.kv_heads * self.head_dim


def kv_geometry(model: nn.Module) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a decoder-only transformers model."""
    cfg = model.config
    try:
        layers = cfg.num_hidden_layers
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    except AttributeError as exc:
        raise KVCacheError(
            f"cannot read the attention geometry of {type(model).__name__}: {exc}"
        ) from None
    return int(layers), int(kv_heads), int(head_dim)


def _find_cache(args: tuple, kwargs: dict) -> CompressedCache | None:
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    return cache if isinstance(cache, CompressedCache) else None


def _begin_forward_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    cache = _find_cache(args, kwargs)
    if cache is not None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        cache.begin_forward(mask, kwargs.get("position_ids"))


def _layer_input_hook(index: int):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = _find_cache(args, kwargs)
        if cache is not None and cache.config.sinks:
            hidden = args[0] if args else kwargs.get("hidden_states")
            cache.layer_inputs[index] = hidden.detach()

    return hook


def _attention_input_hook(index: int):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = _find_cache(args, kwargs)
        if cache is not None and cache.config.shrink is not None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            cache.attention_inputs[index] = hidden.detach()

    return hook


def _install_hooks(model: nn.Module) -> None:
    """Pre-hooks (once per model): the model's mask and positions; each block's input and its
    attention's input."""
    if getattr(model, _HOOK_ATTR, None) is not None:
        return
    adapter = adapter_for(model)
    handles = [model.register_forward_pre_hook(_begin_forward_hook, with_kwargs=True)]
    for index, block in enumerate(adapter.block_list(model)):
        handles.append(block.register_forward_pre_hook(_layer_input_hook(index), with_kwargs=True))
        attention = block.get_submodule(adapter.attention_module)
        handles.append(
            attention.register_forward_pre_hook(_attention_input_hook(index), with_kwargs=True)
        )
    setattr(model, _HOOK_ATTR, handles)


def make_cache(model: nn.Module, config: KVCacheConfig | None = None) -> CompressedCache:
    """A fresh compressed cache for ``model`` (``config`` defaults to the one its recipe set)."""
    config = config or getattr(model, KV_CONFIG_ATTR, None)
    if config is None:
        raise KVCacheError(
            "no KV-cache configuration: pass one, or quantize with a kv_cache recipe"
        )
    _install_hooks(model)
    layers, kv_heads, head_dim = kv_geometry(model)
    return CompressedCache(config, layers, kv_heads, head_dim)
