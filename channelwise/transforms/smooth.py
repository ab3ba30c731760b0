"""Channel scaling that leaves a model's function unchanged: ``X·Wᵀ = (X·diag(s)⁻¹)·(W·diag(s))ᵀ``.

A linear ``y = X·Wᵀ + b`` with ``X ∈ ℝ^{T×C}`` and ``W ∈ ℝ^{O×C}`` (PyTorch layout, rows are
output channels) computes the same ``y`` when its input channel ``j`` is divided by ``s_j > 0`` and
its weight column ``j`` multiplied by ``s_j``. The division ``X → X/s`` costs nothing at inference
when it is folded into the op that produces ``X``:

``fold_scales_into_norm(norm, linears, s, transposed)``
    ``X`` is a norm's output, ``normalize(x)·γ + β`` (LayerNorm) or ``normalize(x)·γ`` (RMSNorm).
    Dividing ``γ`` (and ``β``) by ``s`` divides every output channel by ``s``; every linear that
    reads the norm gets ``W ← W·diag(s)``. Exact for any module whose output is
    ``f(x)·gain + bias`` channel-wise: LayerNorm, RMSNorm, and Gemma's RMSNorm, whose gain is
    ``1 + weight`` (:func:`~channelwise.adapters.base.norm_gain`); *not* for post-LN blocks,
    where the norm's output is also the residual stream (the adapters refuse those through
    ``ModelAdapter.require_folding``).
    A runtime output shift installed by :mod:`channelwise.transforms.shift` is divided too.
    Shapes: ``norm.weight`` ``(C,)``, each linear ``(O_i, C)``, ``s`` ``(C,)``.

``fold_scales_between_linears(prev, next_linears, s, transposed)``
    ``X`` is the output of ``prev`` (``(C, C_prev)``), passed on through ops that are linear per
    channel: ``prev``'s output rows and bias are divided by ``s``, the consumers' columns
    multiplied. Exact for v_proj → o_proj without grouped-query attention (attention mixes tokens
    with weights that sum to one, channel by channel) and for up_proj → down_proj (down reads
    ``act(gate)·up``, linear in up). Not exact through a non-linearity such as GELU.

``fold_scales_grouped_heads(v_proj, o_proj, s_kv, n_rep, transposed, head_dim=…)``
    Grouped-query attention: query head ``h`` reads KV head ``h // n_rep``, so o_proj's input
    channel ``(h, d)`` is v channel ``(h // n_rep, d)``. One factor per v channel
    (``num_kv_heads·head_dim``) divides v_proj's rows and multiplies the o_proj columns of every
    query head of its group. ``reduce_to_kv_heads`` turns a per-o_proj-channel vector
    (``num_heads·head_dim``) into one per v channel (max over the group), so a method can derive
    ``s_kv`` from statistics of o_proj's input; ``expand_to_query_heads`` is its converse.

``smooth_scales(act_absmax, weight_absmax, alpha)`` is SmoothQuant's choice of ``s``
(``max|X_j|^α / max|W_{:,j}|^{1−α}``) and ``weight_input_absmax(linears, transposed)`` the weight
term over all consumers.

Every fold validates all shapes before touching a weight (a refused fold changes nothing) and
computes in float32 before casting back to the parameter's dtype. ``transposed`` says the
linears store ``(in, out)`` (GPT-2's ``Conv1D``); see :func:`channelwise.adapters.linear_weight`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from channelwise.adapters import column_readers, linear_weight, norm_gain, set_norm_gain
from channelwise.errors import NonFiniteError, RecipeError, UnsupportedModelError

#: Floor of both terms of the SmoothQuant ratio, and of the resulting factor.
MIN_SCALE = 1e-5
#: Attribute of a norm carrying a runtime output shift (``transforms.shift``): ``(hook, handle)``.
NORM_SHIFT_ATTR = "_channelwise_norm_shift"


def smooth_scales(act_absmax: Tensor, weight_absmax: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's per-channel factor ``s_j = max|X_j|^α / max|W_{:,j}|^{1−α}``, ``(C,)`` float32.

    Both abs-maxima are clamped to at least ``MIN_SCALE`` before the powers, and so is ``s``. A
    channel whose activation or weight abs-max is zero (never active, or read by no weight) gets
    ``s = 1``: there is nothing to migrate, and an extreme factor would only blow up the other side.
    """
    if not isinstance(alpha, int | float) or not 0.0 <= float(alpha) <= 1.0:
        raise RecipeError(f"smoothing alpha must be a number in [0, 1], got {alpha!r}")
    for name, value in (("act_absmax", act_absmax), ("weight_absmax", weight_absmax)):
        if not isinstance(value, Tensor) or value.dim() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise RecipeError(
                f"smooth_scales: {name} must be a 1-D tensor (channels,), got {shape}"
            )
    if act_absmax.shape != weight_absmax.shape:
        raise RecipeError(
            f"smooth_scales: activation statistics cover {act_absmax.numel()} channels but the "
            f"weights have {weight_absmax.numel()} input channels"
        )
    act = act_absmax.detach().float()
    weight = weight_absmax.detach().float().to(act.device)
    for name, value in (("activation", act), ("weight", weight)):
        if not torch.isfinite(value).all():
            raise NonFiniteError(f"smooth_scales: the {name} abs-max contains NaN/inf")
        if (value < 0).any():
            raise RecipeError(f"smooth_scales: the {name} abs-max must be non-negative")
    alpha = float(alpha)
    s = act.clamp(min=MIN_SCALE).pow(alpha) / weight.clamp(min=MIN_SCALE).pow(1.0 - alpha)
    s = s.clamp(min=MIN_SCALE)
    return torch.where((act == 0) | (weight == 0), torch.ones_like(s), s)


def weight_input_absmax(linears: Iterable[nn.Module], transposed: bool) -> Tensor:
    """``max_i max_o |W_i[o, j]|`` over every linear's output rows: ``(C,)`` float32."""
    linears = _as_list(linears, "weight_input_absmax")
    in_features = {_in_features(module, transposed) for module in linears}
    if len(in_features) != 1:
        raise RecipeError(
            "weight_input_absmax: the linears read inputs of different widths "
            f"{sorted(in_features)}"
        )
    result = None
    for module in linears:
        column_max = linear_weight(module, transposed).detach().abs().amax(dim=0).float()
        result = column_max if result is None else torch.maximum(result, column_max.to(result))
    return result


def fold_scales_into_norm(
    norm: nn.Module, linears: Iterable[nn.Module], s: Tensor, transposed: bool
) -> None:
    """Divide ``norm``'s weight (and bias) by ``s`` and multiply each linear's columns by ``s``
    (and those of the norm's column-only readers, :func:`~channelwise.adapters.column_readers`)."""
    linears = _as_list(linears, "fold_scales_into_norm")
    linears += [r for r in column_readers(norm) if all(r is not m for m in linears)]
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 1:
        raise UnsupportedModelError(
            f"cannot fold channel scales into {type(norm).__name__}: it has no per-channel weight "
            "(a LayerNorm/RMSNorm with elementwise affine parameters is needed)"
        )
    channels = weight.numel()
    s = _check_scales(s, channels, f"{type(norm).__name__} with {channels} channels")
    for index, module in enumerate(linears):
        _check_in_features(module, transposed, channels, f"linear {index} reading the norm")
    bias = getattr(norm, "bias", None)
    gain = norm_gain(norm).clone()
    _divide(gain, s)
    set_norm_gain(norm, gain)
    if isinstance(bias, Tensor):
        _divide(bias.data, s)
    shift = getattr(norm, NORM_SHIFT_ATTR, None)
    if shift is not None:  # a runtime shift z on the output scales with it: (γx̂ − z)/s
        shift[0].z = shift[0].z / s.to(shift[0].z.device)
    for module in linears:
        _scale_columns(module, s, transposed)


def fold_scales_between_linears(
    prev: nn.Module, next_linears: Iterable[nn.Module], s: Tensor, transposed: bool
) -> None:
    """Divide ``prev``'s output rows (and bias) by ``s``; multiply consumers' columns by ``s``."""
    next_linears = _as_list(next_linears, "fold_scales_between_linears")
    channels = _out_features(prev, transposed)
    s = _check_scales(s, channels, f"the {channels} output channels of {type(prev).__name__}")
    for index, module in enumerate(next_linears):
        _check_in_features(module, transposed, channels, f"linear {index} reading prev")
    _scale_rows(prev, s, transposed)
    for module in next_linears:
        _scale_columns(module, s, transposed)


def fold_scales_grouped_heads(
    v_proj: nn.Module,
    o_proj: nn.Module,
    s_kv: Tensor,
    n_rep: int,
    transposed: bool,
    *,
    head_dim: int,
) -> None:
    """Fold one factor per v channel into v_proj's rows and the o_proj columns of its head group.

    ``s_kv`` is ``(num_kv_heads·head_dim,)``; o_proj reads ``num_kv_heads·n_rep·head_dim``
    channels, query head ``h`` from KV head ``h // n_rep``.
    """
    n_rep, head_dim = _positive_int(n_rep, "n_rep"), _positive_int(head_dim, "head_dim")
    kv_channels = _out_features(v_proj, transposed)
    if kv_channels % head_dim:
        raise RecipeError(
            f"fold_scales_grouped_heads: v_proj has {kv_channels} output channels, "
            f"not a multiple of head_dim {head_dim}"
        )
    s_kv = _check_scales(s_kv, kv_channels, f"the {kv_channels} output channels of v_proj")
    _check_in_features(o_proj, transposed, kv_channels * n_rep, f"o_proj (n_rep {n_rep})")
    s_o = expand_to_query_heads(s_kv, n_rep, head_dim)
    _scale_rows(v_proj, s_kv, transposed)
    _scale_columns(o_proj, s_o, transposed)


def reduce_to_kv_heads(s_o: Tensor, n_rep: int, head_dim: int) -> Tensor:
    """``(num_heads·head_dim,)`` → ``(num_kv_heads·head_dim,)``: max over each KV head's group."""
    n_rep, head_dim = _positive_int(n_rep, "n_rep"), _positive_int(head_dim, "head_dim")
    if not isinstance(s_o, Tensor) or s_o.dim() != 1 or s_o.numel() % (n_rep * head_dim):
        shape = tuple(s_o.shape) if isinstance(s_o, Tensor) else type(s_o).__name__
        raise RecipeError(
            f"reduce_to_kv_heads: expected a 1-D tensor of num_heads·head_dim channels, a "
            f"multiple of n_rep·head_dim = {n_rep * head_dim}; got {shape}"
        )
    return s_o.view(-1, n_rep, head_dim).amax(dim=1).reshape(-1)


def expand_to_query_heads(s_kv: Tensor, n_rep: int, head_dim: int) -> Tensor:
    """``(num_kv_heads·head_dim,)`` → ``(num_heads·head_dim,)``: each KV head ``n_rep`` times."""
    n_rep, head_dim = _positive_int(n_rep, "n_rep"), _positive_int(head_dim, "head_dim")
    if not isinstance(s_kv, Tensor) or s_kv.dim() != 1 or s_kv.numel() % head_dim:
        shape = tuple(s_kv.shape) if isinstance(s_kv, Tensor) else type(s_kv).__name__
        raise RecipeError(
            f"expand_to_query_heads: expected a 1-D tensor of num_kv_heads·head_dim channels, a "
            f"multiple of head_dim {head_dim}; got {shape}"
        )
    kv_heads = s_kv.numel() // head_dim
    return s_kv.view(kv_heads, 1, head_dim).expand(kv_heads, n_rep, head_dim).reshape(-1)


# --- helpers -------------------------------------------------------------------------------------


def _as_list(linears: Iterable[nn.Module] | nn.Module, where: str) -> list[nn.Module]:
    if isinstance(linears, nn.Module):
        linears = [linears]
    linears = list(linears)
    if not linears:
        raise RecipeError(f"{where}: no linears given to fold the scales into")
    return linears


def _weight_2d(module: nn.Module, transposed: bool) -> Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise UnsupportedModelError(
            f"{type(module).__name__} has no 2-D weight; channel scales fold into linears only"
        )
    return linear_weight(module, transposed)


def _in_features(module: nn.Module, transposed: bool) -> int:
    return _weight_2d(module, transposed).shape[1]


def _out_features(module: nn.Module, transposed: bool) -> int:
    return _weight_2d(module, transposed).shape[0]


def _check_in_features(module: nn.Module, transposed: bool, channels: int, what: str) -> None:
    out_features, in_features = _weight_2d(module, transposed).shape
    if in_features != channels:
        layout = "(in, out)" if transposed else "(out, in)"
        raise RecipeError(
            f"{what} ({type(module).__name__}, {out_features}×{in_features} as (out, in), stored "
            f"{layout}) reads {in_features} channels, but the scales cover {channels}"
        )


def _check_scales(s: Tensor, channels: int, what: str) -> Tensor:
    if not isinstance(s, Tensor) or s.dim() != 1 or s.numel() != channels:
        shape = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
        raise RecipeError(f"scales of shape {shape} do not fit {what}: expected ({channels},)")
    s = s.detach().float()
    if not torch.isfinite(s).all():
        raise NonFiniteError(f"scales for {what} contain NaN/inf")
    if (s <= 0).any():
        raise RecipeError(f"scales for {what} must be positive (min {s.min().item():.3g})")
    return s


def _positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecipeError(f"{name} must be a positive integer, got {value!r}")
    return value


def _divide(t: Tensor, s: Tensor) -> None:
    t.copy_((t.float() / s.to(t.device)).to(t.dtype))


def _scale_columns(module: nn.Module, s: Tensor, transposed: bool) -> None:
    weight = linear_weight(module, transposed)  # (out, in) view of the parameter
    weight.copy_((weight.float() * s.to(weight.device)).to(weight.dtype))


def _scale_rows(module: nn.Module, s: Tensor, transposed: bool) -> None:
    weight = linear_weight(module, transposed)
    weight.copy_((weight.float() / s.to(weight.device)[:, None]).to(weight.dtype))
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor):
        _divide(bias.data, s)


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
