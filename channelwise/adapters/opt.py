"""OPT: pre-LN LayerNorm blocks (125m, 1.3b, …); post-LN OPT-350m cannot take folding transforms.

OPT-350m also projects embeddings in and out (``project_in``/``project_out``, 512 ↔ 1024); they
sit outside the blocks and stay in float.
"""

from channelwise.adapters.base import ModelAdapter, Subset, register_adapter


@register_adapter("opt")
def opt_adapter(config) -> ModelAdapter:
    post_ln = not getattr(config, "do_layer_norm_before", True)
    return ModelAdapter(
        family="opt",
        blocks="model.decoder.layers",
        subsets=(
            Subset(
                "attn_in",
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                prev="self_attn_layer_norm",
                prev_kind="norm",
            ),
            Subset(
                "attn_out", ("self_attn.out_proj",), prev="self_attn.v_proj", prev_kind="linear"
            ),
            Subset("mlp_in", ("fc1",), prev="final_layer_norm", prev_kind="norm"),
            Subset("mlp_out", ("fc2",), prev="fc1", prev_kind=None),
        ),
        embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        final_norm=None if post_ln else "model.decoder.final_layer_norm",
        lm_head="lm_head",
        norm_type="layernorm",
        attention={
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.out_proj",
        },
        folding_unsupported=(
            "this OPT model is post-LN (do_layer_norm_before=False, e.g. OPT-350m): its LayerNorms "
            "act on the residual stream, so folding scales or shifts into them is not exact; "
            "use a pre-LN OPT (125m, 1.3b, …) or a method without folding (rtn)"
        )
        if post_ln
        else None,
    )
