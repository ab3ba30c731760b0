"""Llama family: Llama, Qwen2, Mistral, SmolLM2 (RMSNorm, GQA, RoPE, optionally tied embeddings),
and Qwen3, the same block with an RMSNorm on each head's queries and keys."""

from channelwise.adapters.base import ModelAdapter, Subset, register_adapter

#: Why key-side channel methods refuse a model with per-head query/key norms.
QK_NORM = (
    "its per-head RMSNorm on queries and keys (q_norm/k_norm) sits between k_proj and the "
    "cache, so a transform of k_proj's output channels does not reach the cached keys exactly"
)


def gated_block_adapter(
    config,
    family: str,
    mlp_norm: str = "post_attention_layernorm",
    mlp_act: str = "mlp.act_fn",
    **fields,
) -> ModelAdapter:
    """A decoder of pre-norm blocks with q/k/v/o projections and a gated MLP
    (``gate_proj``, ``up_proj``, ``down_proj``) at ``model.layers``; ``mlp_norm`` is the norm
    the MLP reads, ``fields`` any further :class:`ModelAdapter` fields."""
    # Under grouped-query attention one v_proj channel feeds every query head of its group, so a
    # per-channel factor folds from o_proj into v_proj only if shared across that group.
    grouped = config.num_key_value_heads != config.num_attention_heads
    return ModelAdapter(
        family=family,
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
            Subset("mlp_in", ("mlp.gate_proj", "mlp.up_proj"), prev=mlp_norm, prev_kind="norm"),
            Subset("mlp_out", ("mlp.down_proj",), prev="mlp.up_proj", prev_kind="linear"),
        ),
        embeddings=("model.embed_tokens",),
        final_norm="model.norm",
        lm_head="lm_head",
        norm_type="rmsnorm",
        mlp_act=mlp_act,
        attention={
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.o_proj",
        },
        **fields,
    )


@register_adapter("llama", "qwen2", "mistral")
def llama_adapter(config) -> ModelAdapter:
    return gated_block_adapter(config, "llama")


@register_adapter("qwen3")
def qwen3_adapter(config) -> ModelAdapter:
    return gated_block_adapter(config, "qwen3", kv_transforms_unsupported=QK_NORM)
