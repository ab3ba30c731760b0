"""Evaluating a compressed KV cache: perplexity through the cache, and the bytes it holds.

**Protocol (chunked prefill).** Each evaluation window is fed in chunks of ``chunk`` tokens
through one fresh cache; each chunk's queries attend to what the cache holds after storing the
chunk (``CompressedLayer.update``), so every key and value a token reads has gone through the
cache's storage policy — compressed, unless the policy keeps it in float (the newest tokens of a
residual window that has not filled, attention sinks). With ``chunk`` equal to the residual
window (the presets' 32) every flush happens as the chunk arrives and *all* tokens, the chunk's
own included, are read back compressed: stricter than decoding, where a token still in the
residual window is read in float. Scored are the same tokens as ``evaluate.perplexity``
(every token of a window but the first), so a float cache gives the same perplexity.

**Bytes.** :func:`kv_bytes` feeds ``tokens`` through the model into a fresh cache, in chunks of
``chunk``, and returns the bytes the cache holds against a float16 cache of the same tokens.
Generation stores the same thing: tokens reach the cache in order and flushes fall on the same
multiples of the residual window, whatever the chunking (``benchmarks/kv_cache.py`` checks it
with a real 2,048-token ``generate``).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from tqdm.auto import tqdm

from channelwise.engine import model_device
from channelwise.errors import KVCacheError
from channelwise.evaluate.perplexity import (
    check_window_length,
    next_token_nll,
    perplexity_from_nll,
)
from channelwise.kvcache.cache import KVCacheConfig, make_cache


def cache_kwarg(model: nn.Module) -> str:
    """The forward's name for the cache argument: ``cache`` (transformers ≥ 5.20-ish renamed
    it) or the older ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def chunked_window_nll(
    model: nn.Module,
    windows: torch.Tensor,
    config: KVCacheConfig | None = None,
    chunk: int = 32,
    batch_size: int = 4,
    progress: bool = True,
) -> torch.Tensor:
    """Summed next-token NLL of each window read through a compressed cache → ``(n,)`` float64."""
    if chunk < 1:
        raise KVCacheError(f"chunk must be a positive number of tokens, got {chunk}")
    check_window_length(model, windows.shape[-1])
    device = model_device(model)
    totals = []
    with torch.no_grad():
        for start in tqdm(
            range(0, windows.shape[0], batch_size),
            desc="perplexity (KV cache)",
            disable=not progress,
            leave=False,
        ):
            batch = windows[start : start + batch_size].to(device)
            cache = make_cache(model, config)
            name = cache_kwarg(model)
            logits = [
                model(batch[:, c : c + chunk], **{name: cache}, use_cache=True).logits
                for c in range(0, batch.shape[1], chunk)
            ]
            totals.append(next_token_nll(torch.cat(logits, dim=1), batch))
    return torch.cat(totals)


def chunked_perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    config: KVCacheConfig | None = None,
    chunk: int = 32,
    batch_size: int = 4,
    progress: bool = True,
) -> float:
    """Perplexity of ``windows`` ``(n, seq)`` with every token read through the cache."""
    nll = chunked_window_nll(model, windows, config, chunk, batch_size, progress)
    return perplexity_from_nll(nll, windows, "through the compressed cache")


def kv_bytes(
    model: nn.Module,
    tokens: torch.Tensor,
    config: KVCacheConfig | None = None,
    chunk: int = 32,
) -> tuple[int, int]:
    """``(held, float16)``: bytes a cache holds after ``tokens`` ``(1, n)`` went through it,
    and what a float16 cache of the same tokens holds."""
    device = model_device(model)
    cache = make_cache(model, config)
    name = cache_kwarg(model)
    with torch.no_grad():
        for c in range(0, tokens.shape[1], chunk):
            model(tokens[:, c : c + chunk].to(device), **{name: cache}, use_cache=True)
    return cache.nbytes(), cache.float16_nbytes()
