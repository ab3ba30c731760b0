"""Swin Transformers (``SwinModel``): pre-LN blocks in stages, patch merging between stages.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows"
(arXiv 2103.14030). A Swin block is a ViT block (``layernorm_before`` → window attention
``q/k/v/o_proj``, ``layernorm_after`` → ``mlp.fc1/fc2``) whose attention runs inside
(shifted) windows with a relative-position bias added to its scores; the block engine sees the
blocks of all stages as one sequence (``encoder.layers.S.blocks.J``, their input dimensions
captured per block). Between two stages the patch merging (a LayerNorm over four neighbouring
tokens and the ``reduction`` linear) runs as a transition outside the blocks. A recipe whose
weight steps all handle transitions (``rtn``, with ``repq_vit`` before it: the ``vit-rtn`` and
``repq-vit`` presets) quantizes the ``reduction`` too, after the stage's last block: RepQ-ViT
reparameterizes its LayerNorm into it, as the paper does, RTN rounds its weights, and its input
gets the recipe's activation quantizer. I&S-ViT and RepQuant, which train whole blocks, give
it the same treatment untrained (:class:`~channelwise.methods.repq_vit.RepQViTTransition`);
LRP-QViT scores and allocates it as one more layer. Deviation: under BiViT and LPViT the
merging stays in float (its ``reduction`` is about 6% of Swin-T's linear weights). There is
no class token: image features are the mean of all tokens. Images must leave the last stage
at least one window wide (224 px for Swin-T: transformers' Swin cannot shrink a window to a
narrower stage, the relative-position bias being sized for the full window), checked before
any forward. Swin V2 (post-norm, cosine attention) is not supported.
"""

from dataclasses import replace

from channelwise.adapters.base import ModelAdapter, Subset, register_adapter
from channelwise.adapters.vit import pre_ln_vit_adapter
from channelwise.errors import DataSourceError


def _stage_ends(depths: list[int]) -> dict[int, int]:
    """``{index of a stage's last block: stage}`` for every stage followed by patch merging."""
    ends, total = {}, 0
    for stage, depth in enumerate(depths[:-1]):
        total += depth
        ends[total - 1] = stage
    return ends


@register_adapter("swin")
def swin_adapter(config) -> ModelAdapter:
    depths = list(config.depths)
    paths = tuple(
        f"encoder.layers.{stage}.blocks.{j}"
        for stage, depth in enumerate(depths)
        for j in range(depth)
    )
    ends = _stage_ends(depths)

    def check_image(height: int, width: int) -> None:
        window, patch, merges = config.window_size, config.patch_size, len(depths) - 1
        narrowest = min(_last_stage_tokens(size, patch, merges) for size in (height, width))
        if narrowest < window:
            raise DataSourceError(
                f"this Swin attends in {window}×{window}-token windows, but {height}×{width} px "
                f"images leave its last stage {narrowest} tokens wide (transformers' Swin "
                f"cannot shrink a window); use images of at least {patch * window * 2**merges} "
                f"px (--resolution; the model was trained at {config.image_size})"
            )

    base = pre_ln_vit_adapter("swin", "encoder.layers", ("layernorm_before", "layernorm_after"))
    return replace(
        base,
        block_paths=paths,
        transitions=tuple(
            (index, f"encoder.layers.{stage}.downsample") for index, stage in ends.items()
        ),  # fmt: skip
        transition_subsets=(Subset("merge", ("reduction",), prev="norm", prev_kind="norm"),),
        class_token=False,
        check_image=check_image,
        native_resolution=config.image_size,
    )


def _last_stage_tokens(pixels: int, patch: int, merges: int) -> int:
    """Tokens along one side after the patch embedding (padded) and ``merges`` halvings."""
    tokens = -(-pixels // patch)
    for _ in range(merges):
        tokens = (tokens + 1) // 2
    return tokens
