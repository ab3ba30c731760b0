"""Llama family: Llama, Qwen2, Mistral, SmolLM2 (RMSNorm, GQA, RoPE, optionally tied embeddings)."""

from channelwise.adapters.base import ModelAdapter, Subset, register_adapter


@register_adapter("llama", "qwen2", "mistral")
def llama_adapter(config) -> ModelAdapter:
    # Under grouped-query attention one v_proj channel feeds every query head of its group, so a
    # per-channel factor folds from o_proj into v_proj only if shared across that group.
    grouped = config.num_key_value_heads != config.num_attention_heads
    return ModelAdapter(
        family="llama",
        blocks="model.layers",
        subsets=(
            Subset(
                "attn_in",
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                prev="input_layernorm",
                prev_kind="norm",
            ),
            Subset(
                "attn_out",
                ("self_attn.o_proj",),
                prev="self_attn.v_proj",
                prev_kind="grouped_heads" if grouped else "linear",
            ),
            Subset(
                "mlp_in",
                ("mlp.gate_proj", "mlp.up_proj"),
                prev="post_attention_layernorm",
                prev_kind="norm",
            ),
            Subset("mlp_out", ("mlp.down_proj",), prev="mlp.up_proj", prev_kind="linear"),
        ),
        embeddings=("model.embed_tokens",),
        final_norm="model.norm",
        lm_head="lm_head",
        norm_type="rmsnorm",
        attention={
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.o_proj",
        },
    )
