"""ViT and DeiT (``ViTModel``, ``DeiTModel``): pre-LN LayerNorm blocks without LayerScale.

The same block as DINOv2 with other norm names (``layernorm_before``/``layernorm_after``). The
patch embedding (a convolution), the final LayerNorm, ViT's pooler and DeiT's distillation
token sit outside the blocks and stay in float. A classification checkpoint
(``ViTForImageClassification``) loads as its backbone; its head is not used (top-1 comes from
the frozen probe).
"""

from channelwise.adapters.base import ModelAdapter, Subset, register_adapter


@register_adapter("vit", "deit")
def vit_adapter(config) -> ModelAdapter:
    return ModelAdapter(
        family=config.model_type,
        blocks="layers",
        subsets=(
            Subset(
                "attn_in",
                ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
                prev="layernorm_before",
                prev_kind="norm",
            ),
            Subset("attn_out", ("attention.o_proj",), prev="attention.v_proj", prev_kind="linear"),
            Subset("mlp_in", ("mlp.fc1",), prev="layernorm_after", prev_kind="norm"),
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
        build_kwargs={"add_pooling_layer": False},
    )
