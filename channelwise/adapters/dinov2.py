"""DINOv2 Vision Transformers (``Dinov2Model``): pre-LN LayerNorm blocks with LayerScale.

The residual branches are scaled by LayerScale (``layer_scale1``/``layer_scale2``) after
``o_proj`` and ``fc2``; no channel transform folds through them, so none is declared. The patch
embedding (a convolution) and the final LayerNorm sit outside the blocks and stay in float.
The SwiGLU variant (``use_swiglu_ffn``, the giant model) has other MLP names and is refused.
"""

from channelwise.adapters.base import ModelAdapter, Subset, register_adapter
from channelwise.errors import UnsupportedModelError


@register_adapter("dinov2")
def dinov2_adapter(config) -> ModelAdapter:
    if getattr(config, "use_swiglu_ffn", False):
        raise UnsupportedModelError(
            "DINOv2 with a SwiGLU MLP (use_swiglu_ffn=True) is not supported yet; the "
            "small, base and large models (GELU MLP) are"
        )
    return ModelAdapter(
        family="dinov2",
        blocks="encoder.layer",
        subsets=(
            Subset(
                "attn_in",
                ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
                prev="norm1",
                prev_kind="norm",
            ),
            Subset("attn_out", ("attention.o_proj",), prev="attention.v_proj", prev_kind="linear"),
            Subset("mlp_in", ("mlp.fc1",), prev="norm2", prev_kind="norm"),
            Subset("mlp_out", ("mlp.fc2",), prev="mlp.fc1", prev_kind=None),
        ),
        embeddings=("embeddings.patch_embeddings.projection",),
        final_norm="layernorm",
        lm_head=None,
        norm_type="layernorm",
        attention={
            "q": "attention.q_proj",
            "k": "attention.k_proj",
            "v": "attention.v_proj",
            "o": "attention.o_proj",
        },
        attention_module="attention",
        modality="vision",
    )
