"""Per-subset channel scales: fold one factor vector into whatever produces a subset's input.

An adapter :class:`~channelwise.adapters.Subset` says which op produces its linears' input
(``prev_kind``): a norm, a linear, or v_proj under grouped-query attention. Methods that search
or compute per-channel factors (AWQ, SmoothQuant+) work on one vector per subset; this module
maps it onto the exact folds of :mod:`channelwise.transforms.smooth`.

Channel spaces: a subset's *input* channels are its consumers' input columns (``C``); its *fold*
channels are where the factor lives in the producer. They coincide except for ``grouped_heads``,
where o_proj reads ``num_heads·head_dim`` channels but v_proj produces ``num_kv_heads·head_dim``:
``to_fold_channels`` reduces (max over each KV head's group) and ``to_input_channels`` repeats.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from channelwise.adapters import ModelAdapter, Subset
from channelwise.errors import RecipeError
from channelwise.transforms.smooth import (
    expand_to_query_heads,
    fold_scales_between_linears,
    fold_scales_grouped_heads,
    fold_scales_into_norm,
    reduce_to_kv_heads,
)

#: ``Subset.prev_kind`` values whose producer can absorb a per-channel factor exactly.
FOLDABLE_KINDS = ("norm", "linear", "grouped_heads")


def foldable_subsets(adapter: ModelAdapter) -> tuple[Subset, ...]:
    """The adapter's subsets whose input comes from a norm, a linear or grouped v heads."""
    return tuple(s for s in adapter.subsets if s.prev_kind in FOLDABLE_KINDS and s.prev)


def head_geometry(config) -> tuple[int, int]:
    """``(n_rep, head_dim)``: query heads per KV head and channels per head of a HF config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads // kv_heads, head_dim


def to_fold_channels(subset: Subset, v: Tensor, n_rep: int, head_dim: int) -> Tensor:
    """A per-input-channel vector ``(C,)`` as one per fold channel (max over a KV group)."""
    if subset.prev_kind == "grouped_heads":
        return reduce_to_kv_heads(v, n_rep, head_dim)
    return v


def to_input_channels(subset: Subset, s: Tensor, n_rep: int, head_dim: int) -> Tensor:
    """A per-fold-channel factor as one per consumer input channel ``(C,)``."""
    if subset.prev_kind == "grouped_heads":
        return expand_to_query_heads(s, n_rep, head_dim)
    return s


def fold_subset(
    block: nn.Module, subset: Subset, s: Tensor, transposed: bool, n_rep: int, head_dim: int
) -> None:
    """Divide the subset's input by ``s`` (per fold channel) and multiply its linears' columns.

    Exact in float: the norm's γ (and β), or the producing linear's rows (and bias), absorb
    ``1/s``. Shapes: ``s`` is ``(C,)``, or ``(num_kv_heads·head_dim,)`` for ``grouped_heads``.
    """
    linears = [block.get_submodule(name) for name in subset.linears]
    prev = block.get_submodule(subset.prev)
    with torch.no_grad():
        if subset.prev_kind == "norm":
            fold_scales_into_norm(prev, linears, s, transposed)
        elif subset.prev_kind == "linear":
            fold_scales_between_linears(prev, linears, s, transposed)
        elif subset.prev_kind == "grouped_heads":
            fold_scales_grouped_heads(prev, linears[0], s, n_rep, transposed, head_dim=head_dim)
        else:
            raise RecipeError(
                f"subset '{subset.name}' has no op to fold scales into "
                f"(prev_kind {subset.prev_kind!r})"
            )


__all__ = [
    "FOLDABLE_KINDS",
    "fold_subset",
    "foldable_subsets",
    "head_geometry",
    "to_fold_channels",
    "to_input_channels",
]
