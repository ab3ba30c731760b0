"""Compressed KV caches: codecs, the transformers ``Cache`` they live in, and their evaluation."""

from channelwise.kvcache import cskv, rotatekv  # noqa: F401  (register the methods)
from channelwise.kvcache.cache import (
    CompressedCache,
    CompressedLayer,
    KVCacheConfig,
    kv_geometry,
    make_cache,
)
from channelwise.kvcache.codecs import BFPCodec, Encoded, GroupQuantCodec, KVCodec
from channelwise.kvcache.evaluate import chunked_perplexity, kv_bytes

__all__ = [
    "BFPCodec",
    "CompressedCache",
    "CompressedLayer",
    "Encoded",
    "GroupQuantCodec",
    "KVCacheConfig",
    "KVCodec",
    "chunked_perplexity",
    "kv_bytes",
    "kv_geometry",
    "make_cache",
]
