"""ViT and DeiT (``ViTModel``, ``DeiTModel``): pre-LN LayerNorm blocks without LayerScale.

The same block as DINOv2 with other norm names (``layernorm_before``/``layernorm_after``). The
patch embedding (a convolution), the final LayerNorm, ViT's pooler and DeiT's distillation
token sit outside the blocks and stay in float. A classification checkpoint
(``ViTForImageClassification``) loads as its backbone; its head is not used (top-1 comes from
the frozen probe). Images are taken at the checkpoint's own size (``image_size``) unless the
user gives another, to which the position embeddings are interpolated (transformers'
``interpolate_pos_encoding``).
"""

from dataclasses import replace

from channelwise.adapters.base import ModelAdapter, Subset, register_adapter


def pre_ln_vit_adapter(
    family: str, blocks: str, norms: tuple[str, str], build_kwargs: dict | None = None
) -> ModelAdapter:
    """The adapter of pre-LN ViT blocks at ``blocks``, each with ``attention.{q,k,v,o}_proj``
    and ``mlp.fc1/fc2``, its attention and MLP LayerNorms named ``norms``."""
    before, after = norms
    return ModelAdapter(
        family=family,
        blocks=blocks,
        subsets=(
            Subset(
                "attn_in",
                ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
                prev=before,
                prev_kind="norm",
            ),
            Subset("attn_out", ("attention.o_proj",), prev="attention.v_proj", prev_kind="linear"),
            Subset("mlp_in", ("mlp.fc1",), prev=after, prev_kind="norm"),
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
        build_kwargs=build_kwargs or {},
    )


@register_adapter("vit", "deit")
def vit_adapter(config) -> ModelAdapter:
    norms = ("layernorm_before", "layernorm_after")
    adapter = pre_ln_vit_adapter(config.model_type, "layers", norms, {"add_pooling_layer": False})
    return replace(
        adapter,
        native_resolution=config.image_size,
        forward_kwargs={"interpolate_pos_encoding": True},
    )
