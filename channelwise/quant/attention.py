"""Fake-quantization of the attention matmul inputs: q, k, v and the attention probabilities.

Installed through transformers' attention interface: the model runs a registered ``channelwise``
attention function, which quantizes what the block's attention module has asked for and then
computes scaled dot-product attention. ``k`` and ``v`` are quantized as the attention reads them,
after RoPE and after the cache update — this is the simulated KV-cache hook point (every cached
key/value goes through the quantizer). Tensors are ``(batch, heads, tokens, head_dim)``, so on the
quantizer's 2-D view a row is one head's vector for one token: ``token`` granularity is per token
per head; ``group`` runs along ``head_dim``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from channelwise.quant.core import QuantSpec, fake_quantize

ATTENTION_IMPLEMENTATION = "channelwise"
_ATTR = "_channelwise_attention_quantizers"


@dataclass(frozen=True)
class AttentionQuantizers:
    """Which attention inputs to quantize; ``None`` leaves that input in float."""

    q: QuantSpec | None = None
    k: QuantSpec | None = None
    v: QuantSpec | None = None
    probs: QuantSpec | None = None


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def channelwise_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """Attention with the module's quantizers applied; same contract as transformers' sdpa."""
    quant: AttentionQuantizers = getattr(module, _ATTR, None) or AttentionQuantizers()
    if quant.q is not None:
        query = fake_quantize(query, quant.q)
    if quant.k is not None:
        key = fake_quantize(key, quant.k)
    if quant.v is not None:
        value = fake_quantize(value, quant.v)
    n_rep = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if quant.probs is None:
        causal = attention_mask is None and query.shape[2] > 1
        out = torch.nn.functional.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=_align(attention_mask, query, key),
            dropout_p=dropout,
            scale=scaling,
            is_causal=causal and key.shape[2] == query.shape[2],
        )
        return out.transpose(1, 2).contiguous(), None
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    # The most negative finite value, as eager attention does: a fully masked (padding) row gets
    # uniform probabilities instead of NaN.
    scores = scores.masked_fill(
        ~_keep_mask(attention_mask, query, key), torch.finfo(scores.dtype).min
    )
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = fake_quantize(probs, quant.probs)
    out = torch.matmul(probs, value)
    return out.transpose(1, 2).contiguous(), probs


def _align(mask: Tensor | None, query: Tensor, key: Tensor) -> Tensor | None:
    """A causal mask for a query shorter than the keys (decoding with a cache)."""
    if mask is None and 1 < query.shape[2] < key.shape[2]:
        return _keep_mask(None, query, key)
    return mask


def _keep_mask(mask: Tensor | None, query: Tensor, key: Tensor) -> Tensor:
    """Boolean ``(…, q_len, kv_len)``: True where a query may attend to a key."""
    if mask is not None:
        return mask if mask.dtype == torch.bool else mask == 0
    q_len, kv_len = query.shape[2], key.shape[2]
    rows = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
    return torch.arange(kv_len, device=query.device)[None, :] <= rows


def register_attention() -> None:
    """Make ``channelwise`` a valid attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, channelwise_attention)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def install_attention_quantizers(
    model: nn.Module, attention_modules: list[nn.Module], quantizers: AttentionQuantizers
) -> None:
    """Quantize the attention inputs of ``attention_modules`` from now on."""
    register_attention()
    for module in attention_modules:
        setattr(module, _ATTR, quantizers)
    if model.config._attn_implementation != ATTENTION_IMPLEMENTATION:
        model.set_attn_implementation(ATTENTION_IMPLEMENTATION)


def attention_quantizers(module: nn.Module) -> AttentionQuantizers | None:
    return getattr(module, _ATTR, None)
