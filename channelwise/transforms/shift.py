"""Channel shifting that leaves a model's function unchanged: ``X·Wᵀ + b = (X − z)·Wᵀ + (b + W·z)``.

Outlier Suppression+ (Wei et al., arXiv 2304.09145) and OutlierTune (Wang et al., arXiv
2406.18832) centre each input channel of a linear, ``X̃ = X − z`` with ``z ∈ ℝ^C``, and compensate
in every consumer: ``b ← b + W·z`` (``W`` the weight *before* any later scaling, ``(O, C)``).

``shift_norm_output(norm, linears, z, transposed)``
    ``X`` is a norm's output. A LayerNorm with a bias absorbs the shift, ``β ← β − z``. An RMSNorm
    (Llama family) has no bias, so the shift becomes a runtime op: a forward hook on the norm
    subtracting ``z`` from its output (:func:`install_norm_shift`; it runs before the consumers'
    input quantizers, which are pre-hooks on the linears). Consumers without a bias get one.
    Not exact for post-LN blocks (the adapters refuse those: ``ModelAdapter.require_folding``).

``shift_between_linears(v_proj, o_proj, z_kv, n_rep, head_dim, transposed)``
    ``X`` is the attention output read by o_proj: each head's output is a convex combination of
    its value rows (softmax weights sum to one), so ``v_b ← v_b − z`` shifts o_proj's input by
    exactly ``z`` (repeated over the query heads of each KV group). The MLP's up → down is *not*
    exact: down reads ``act(gate)·up``, and ``act(gate)·(up − z)`` is not a constant shift.

:func:`~channelwise.transforms.smooth.fold_scales_into_norm` divides a norm's runtime shift
along with its weight/bias, so any scaling (this method's or a later step's) can follow a shift.
:class:`ShiftState` records what a method created (runtime shifts, biases) so
``Method.saved_state`` / ``Method.restore`` can persist it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from channelwise.adapters import ModelAdapter, column_readers, linear_weight
from channelwise.errors import NonFiniteError, RecipeError, UnsupportedModelError
from channelwise.transforms.smooth import (
    NORM_SHIFT_ATTR,
    _as_list,
    _check_in_features,
    _out_features,
    expand_to_query_heads,
)

_SHIFT_ATTR = NORM_SHIFT_ATTR
#: Llama's config flags that give its linears a bias (transformers 5): q/k/v/o and gate/up/down.
LLAMA_BIAS_FLAGS = {
    "attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp_bias": ("gate_proj", "up_proj", "down_proj"),
}


class NormShift:
    """Forward hook ``output → output − z`` on a norm; ``z`` is ``(C,)`` float32."""

    def __init__(self, z: Tensor) -> None:
        self.z = z

    def __call__(self, _module: nn.Module, _args: tuple, output: Tensor) -> Tensor:
        return output - self.z.to(device=output.device, dtype=output.dtype)


def norm_shift(norm: nn.Module) -> Tensor | None:
    """The runtime shift installed on ``norm`` (``(C,)``), or ``None``."""
    installed = getattr(norm, _SHIFT_ATTR, None)
    return installed[0].z if installed is not None else None


def install_norm_shift(norm: nn.Module, z: Tensor) -> None:
    """Subtract ``z`` ``(C,)`` from ``norm``'s output from now on (added to any earlier shift)."""
    z = _check_shift(z, _norm_channels(norm), f"{type(norm).__name__}")
    installed = getattr(norm, _SHIFT_ATTR, None)
    if installed is not None:
        installed[0].z = installed[0].z + z.to(installed[0].z.device)
        return
    hook = NormShift(z.clone())
    setattr(norm, _SHIFT_ATTR, (hook, norm.register_forward_hook(hook)))


def remove_norm_shift(norm: nn.Module) -> None:
    installed = getattr(norm, _SHIFT_ATTR, None)
    if installed is not None:
        installed[1].remove()
        delattr(norm, _SHIFT_ATTR)


def ensure_bias(module: nn.Module, transposed: bool) -> nn.Parameter:
    """``module``'s bias, created as zeros ``(out_features,)`` if it has none (exact)."""
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor):
        return bias
    weight = module.weight
    out_features = _out_features(module, transposed)
    module.bias = nn.Parameter(
        torch.zeros(out_features, dtype=weight.dtype, device=weight.device),
        requires_grad=False,
    )
    return module.bias


def fold_shift_into_linears(linears: Iterable[nn.Module], z: Tensor, transposed: bool) -> None:
    """``b ← b + W·z`` for each linear reading ``X̃ = X − z``; ``z`` ``(C,)``, ``W`` ``(O, C)``."""
    linears = _as_list(linears, "fold_shift_into_linears")
    channels = linear_weight(linears[0], transposed).shape[1]
    z = _check_shift(z, channels, f"the {channels} input channels of the linears")
    for index, module in enumerate(linears):
        _check_in_features(module, transposed, channels, f"linear {index} reading the shift")
    for module in linears:
        weight = linear_weight(module, transposed)
        bias = ensure_bias(module, transposed)
        bias.data.copy_((bias.data.float() + weight.float() @ z.to(weight.device)).to(bias.dtype))


def shift_norm_output(
    norm: nn.Module, linears: Iterable[nn.Module], z: Tensor, transposed: bool
) -> None:
    """Shift a norm's output by ``−z`` and compensate in its consumers (exact in float).

    A norm with column-only readers (a router, :func:`~channelwise.adapters.column_readers`) is
    refused: they have no bias to take ``W·z``."""
    linears = _as_list(linears, "shift_norm_output")
    if column_readers(norm):
        raise UnsupportedModelError(
            f"cannot shift the output of {type(norm).__name__}: a module that is not quantized "
            "(a router) reads it too and has no bias to absorb the shift"
        )
    channels = _norm_channels(norm)
    z = _check_shift(z, channels, f"{type(norm).__name__} with {channels} channels")
    for index, module in enumerate(linears):
        _check_in_features(module, transposed, channels, f"linear {index} reading the norm")
    fold_shift_into_linears(linears, z, transposed)  # uses W before any later scaling
    bias = getattr(norm, "bias", None)
    if isinstance(bias, Tensor):
        bias.data.copy_((bias.data.float() - z.to(bias.device)).to(bias.dtype))
    else:
        install_norm_shift(norm, z)


def shift_between_linears(
    v_proj: nn.Module,
    o_proj: nn.Module,
    z_kv: Tensor,
    n_rep: int,
    head_dim: int,
    transposed: bool,
) -> None:
    """Shift o_proj's input (the attention output) by ``−z`` through v_proj's bias.

    ``z_kv`` is ``(num_kv_heads·head_dim,)``; o_proj reads it repeated ``n_rep`` times per group
    (``n_rep = 1`` without grouped-query attention). Exact because attention weights sum to one.
    """
    kv_channels = _out_features(v_proj, transposed)
    z_kv = _check_shift(z_kv, kv_channels, f"the {kv_channels} output channels of v_proj")
    z_o = expand_to_query_heads(z_kv, n_rep, head_dim)
    _check_in_features(o_proj, transposed, z_o.numel(), f"o_proj (n_rep {n_rep})")
    fold_shift_into_linears([o_proj], z_o, transposed)
    bias = ensure_bias(v_proj, transposed)
    bias.data.copy_((bias.data.float() - z_kv.to(bias.device)).to(bias.dtype))


def enable_llama_biases(model: nn.Module, adapter: ModelAdapter) -> None:
    """Give every q/k/v/o/gate/up/down of a ``model_type: llama`` model a bias (zeros where new)
    and set ``attention_bias``/``mlp_bias``, so ``from_pretrained`` reloads them all.

    Qwen2 (biases only on q/k/v, no flag for the MLP) and Mistral (no bias flags) have no such
    switch in transformers 5: their created biases travel through :class:`ShiftState`.
    """
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        return
    for flag, names in LLAMA_BIAS_FLAGS.items():
        setattr(config, flag, True)
        for block in adapter.block_list(model):
            for module in block.modules():
                for name in names:
                    child = getattr(module, name, None)
                    if isinstance(child, nn.Linear):
                        ensure_bias(child, False)


class ShiftState:
    """What a shifting method created, for ``saved_state``/``restore``: runtime norm shifts
    (``norm_shift/<path>``) and every bias of a shifted consumer (``bias/<path>``)."""

    def __init__(self) -> None:
        self.norms: dict[str, nn.Module] = {}
        self.biased: dict[str, nn.Module] = {}

    def record(self, ctx, subset) -> None:
        """After shifting ``subset`` of ``ctx``'s block: its norm (if shifted at run time) and
        its consumer linears, by full module path."""
        prefix = f"{ctx.module_path()}."
        norm = ctx.block.get_submodule(subset.prev)
        if norm_shift(norm) is not None:
            self.norms[prefix + subset.prev] = norm
        self.biased.update({prefix + n: ctx.block.get_submodule(n) for n in subset.linears})

    def saved(self) -> dict[str, Tensor]:
        state = {f"norm_shift/{p}": norm_shift(m).detach().float() for p, m in self.norms.items()}
        for path, module in self.biased.items():
            state[f"bias/{path}"] = module.bias.detach().float()
        return state


def restore_shift_state(model: nn.Module, state: dict[str, Tensor], transposed: bool) -> ShiftState:
    """Re-create biases and runtime norm shifts saved by :meth:`ShiftState.saved`; the returned
    state records them again, so a restored model saves them again."""
    restored = ShiftState()
    for key, value in state.items():
        kind, _, path = key.partition("/")
        if kind not in ("norm_shift", "bias"):
            continue
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise RecipeError(
                f"saved shift state names {path}, which this model does not have; the checkpoint "
                "does not match its config"
            ) from None
        if kind == "norm_shift":
            remove_norm_shift(module)
            install_norm_shift(module, value)
            restored.norms[path] = module
        else:
            bias = ensure_bias(module, transposed)
            bias.data.copy_(value.to(device=bias.device, dtype=bias.dtype))
            restored.biased[path] = module
    return restored


def _norm_channels(norm: nn.Module) -> int:
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 1:
        raise RecipeError(
            f"cannot shift the output of {type(norm).__name__}: it has no per-channel weight"
        )
    return weight.numel()


def _check_shift(z: Tensor, channels: int, what: str) -> Tensor:
    if not isinstance(z, Tensor) or z.dim() != 1 or z.numel() != channels:
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise RecipeError(f"shift of shape {shape} does not fit {what}: expected ({channels},)")
    z = z.detach().float()
    if not torch.isfinite(z).all():
        raise NonFiniteError(f"shift for {what} contains NaN/inf")
    return z


__all__ = [
    "NormShift",
    "ShiftState",
    "enable_llama_biases",
    "ensure_bias",
    "fold_shift_into_linears",
    "install_norm_shift",
    "norm_shift",
    "remove_norm_shift",
    "restore_shift_state",
    "shift_between_linears",
    "shift_norm_output",
]
