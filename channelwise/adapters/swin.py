"""Swin Transformers (``SwinModel``): pre-LN blocks in stages, patch merging between stages.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows"
(arXiv 2103.14030). A Swin block is a ViT block (``layernorm_before`` → window attention
``q/k/v/o_proj``, ``layernorm_after`` → ``mlp.fc1/fc2``) whose attention runs inside
(shifted) windows with a relative-position bias added to its scores; the block engine sees the
blocks of all stages as one sequence (``encoder.layers.S.blocks.J``, their input dimensions
captured per block). Between two stages the patch merging (a LayerNorm over four neighbouring
tokens and the ``reduction`` linear) runs as a transition outside the blocks, in float, like
the patch embedding and the final LayerNorm. Deviation from the ViT papers (RepQ-ViT
quantizes the ``reduction`` linear, its LayerNorm reparameterized into it): here the
reduction stays in float (about 4% of Swin-T's linear weights). There is no class token: image
features are the mean of all tokens. Swin V2 (post-norm, cosine attention) is not supported.
"""

from dataclasses import replace

import torch
from torch import nn

from channelwise.adapters.base import ModelAdapter, register_adapter
from channelwise.adapters.vit import pre_ln_vit_adapter


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

    def merge(model: nn.Module, index: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        if index not in ends:
            return hidden
        downsample = model.get_submodule(f"encoder.layers.{ends[index]}.downsample")
        device = next(downsample.parameters()).device
        with torch.no_grad():
            return downsample(hidden.to(device), kwargs["input_dimensions"])

    base = pre_ln_vit_adapter("swin", "encoder.layers", ("layernorm_before", "layernorm_after"))
    return replace(base, block_paths=paths, between_blocks=merge, class_token=False)
