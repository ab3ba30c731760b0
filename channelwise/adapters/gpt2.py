"""GPT-2: pre-LN LayerNorm blocks; ``Conv1D`` stores weights transposed, (in, out)."""

from channelwise.adapters.base import ModelAdapter, Subset, register_adapter


@register_adapter("gpt2")
def gpt2_adapter(config) -> ModelAdapter:
    return ModelAdapter(
        family="gpt2",
        blocks="transformer.h",
        subsets=(
            Subset("attn_in", ("attn.c_attn",), prev="ln_1", prev_kind="norm"),
            Subset("attn_out", ("attn.c_proj",), prev=None),
            Subset("mlp_in", ("mlp.c_fc",), prev="ln_2", prev_kind="norm"),
            Subset("mlp_out", ("mlp.c_proj",), prev=None),
        ),
        embeddings=("transformer.wte", "transformer.wpe"),
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        norm_type="layernorm",
        attention_module="attn",
        attention={"qkv": "attn.c_attn", "o": "attn.c_proj"},
        transposed_weights=True,
    )
