"""GPT-NeoX (Pythia): LayerNorm blocks, fused QKV, optionally parallel attention/MLP residual."""

from channelwise.adapters.base import ModelAdapter, Subset, register_adapter


@register_adapter("gpt_neox")
def gpt_neox_adapter(config) -> ModelAdapter:
    return ModelAdapter(
        family="gpt_neox",
        blocks="gpt_neox.layers",
        subsets=(
            Subset(
                "attn_in", ("attention.query_key_value",), prev="input_layernorm", prev_kind="norm"
            ),
            Subset("attn_out", ("attention.dense",), prev=None),
            Subset(
                "mlp_in", ("mlp.dense_h_to_4h",), prev="post_attention_layernorm", prev_kind="norm"
            ),
            Subset("mlp_out", ("mlp.dense_4h_to_h",), prev=None),
        ),
        embeddings=("gpt_neox.embed_in",),
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",
        norm_type="layernorm",
        attention_module="attention",
        attention={"qkv": "attention.query_key_value", "o": "attention.dense"},
        checkpoint_renames=((r"^embed_out\.", "lm_head."),),  # transformers saves the head so
    )
