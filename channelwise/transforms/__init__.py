"""Equivalence-preserving weight rewrites: exact in float, applied before quantization.

``smooth`` holds the channel-scaling folds (norm → linears, linear → linear, v_proj → o_proj
under grouped-query attention) and SmoothQuant's choice of scales.
"""

from channelwise.transforms.smooth import (
    MIN_SCALE,
    expand_to_query_heads,
    fold_scales_between_linears,
    fold_scales_grouped_heads,
    fold_scales_into_norm,
    reduce_to_kv_heads,
    smooth_scales,
    weight_input_absmax,
)

__all__ = [
    "MIN_SCALE",
    "expand_to_query_heads",
    "fold_scales_between_linears",
    "fold_scales_grouped_heads",
    "fold_scales_into_norm",
    "reduce_to_kv_heads",
    "smooth_scales",
    "weight_input_absmax",
]
