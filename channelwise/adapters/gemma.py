"""Gemma 2 and Gemma 3 (text): the Llama block with sandwich norms and ``(1 + w)`` RMSNorms.

Each block normalizes four times: ``input_layernorm`` before attention, ``post_attention_layernorm``
on attention's output *before* it joins the residual stream, ``pre_feedforward_layernorm`` before
the MLP and ``post_feedforward_layernorm`` after it. The pre-norms feed the linears as in Llama,
so channel scales fold into them (through ``1 + w``: :func:`~channelwise.adapters.base.norm_gain`).
The post-norms sit between the residual writers (o_proj, down_proj) and the stream, and an
RMSNorm's per-channel weight does not commute with a rotation, so QuaRot's residual rotation is
refused. Gemma 2 soft-caps attention logits (``tanh(s/c)·c``, honoured by channelwise's attention)
and final logits; Gemma 3 normalizes each head's queries and keys (q_norm/k_norm), like Qwen3.
Both alternate sliding-window and global layers; the embedding is scaled by √hidden inside its
module, so it stays a table lookup for quantization, and the LM head is tied to it.
"""

from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

from channelwise.adapters.base import ModelAdapter, register_adapter, register_offset_norm
from channelwise.adapters.llama import QK_NORM, gated_block_adapter

register_offset_norm(Gemma2RMSNorm, Gemma3RMSNorm)

SANDWICH_NORMS = (
    "its post-attention and post-feedforward RMSNorms normalize the residual writers' outputs "
    "before they join the stream, and a norm's per-channel weight does not commute with a "
    "rotation of the stream"
)


@register_adapter("gemma2", "gemma3_text")
def gemma_adapter(config) -> ModelAdapter:
    gemma3 = config.model_type == "gemma3_text"
    return gated_block_adapter(
        config,
        "gemma3" if gemma3 else "gemma2",
        mlp_norm="pre_feedforward_layernorm",
        rotation_unsupported=SANDWICH_NORMS,
        kv_transforms_unsupported=QK_NORM if gemma3 else None,
    )
