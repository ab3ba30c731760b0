"""Decode through the sparse kernels: a gated MLP that reads only its active channels.

:class:`SparseGatedMLP` takes the place of a block's MLP (same children, same state-dict keys)
once an activation-sparsity step (:mod:`channelwise.methods.chess`) hooks its ``act_fn``. For up
to :data:`SPARSE_MAX_TOKENS` tokens it computes ``a = act(gate(x))`` densely (the hook zeroes it
below the thresholds), then one op (:func:`channelwise.kernels.sparse.sparse_mlp`) finds the
channels active in any token and multiplies only their ``up_proj`` rows and ``down_proj``
columns: the dense ``down(a · up(x))`` up to float summation order. The op has a fixed output
shape, so it runs inside the compiled decode graph too (:func:`build_sparse_weights` builds the
operands eagerly first). More tokens (prefill), an ``up``/``down`` the kernels cannot read (see
:func:`sparse_weight`), or kernels switched off
(:func:`~channelwise.deploy.kernel_call.use_kernels`) take the dense path.

The kernels read ``down_proj`` by columns, so its columns form (a transposed copy) is built once
and rebuilt if the weight changes: a second copy of ``down_proj``'s weight (its codes, for a
packed one) in memory.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from channelwise.deploy.kernel_call import kernels_enabled
from channelwise.deploy.packed_modules import PackedLinear
from channelwise.kernels import sparse as kernels
from channelwise.kernels.cpu import tensor_version
from channelwise.kernels.extension import loaded_ops

#: Up to this many tokens per call the MLP takes the sparse kernels (decode, small batches).
SPARSE_MAX_TOKENS = 4
_FORMS_ATTR = "_channelwise_sparse_forms"
_HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
)  # fmt: skip


class _Form:
    """A module's weight in one form the sparse kernels read, with the tensors it came from."""

    __slots__ = ("weight", "watched")

    def __init__(self, weight: kernels.SparseWeight | None, watched: tuple) -> None:
        self.weight, self.watched = weight, watched

    def current(self, module: nn.Module) -> bool:
        return all(
            getattr(module, name) is t and tensor_version(t) == version
            for name, t, version in self.watched
        )


def sparse_weight(module: nn.Module, columns: bool = False) -> kernels.SparseWeight | None:
    """``module``'s weight as the sparse kernels read it: by rows as stored, or (``columns``) in
    its columns form (a transposed copy); built once and reused while the module's weight is
    unchanged (inside a compiled graph, reused unchecked: see :func:`build_sparse_weights`).
    None where the kernels cannot stand in for its forward: a forward hook (an input quantizer,
    an online Hadamard), a bias, a grid other than W8 per row or W4 in groups of a multiple of
    32 along the input, or a weight not float32 on the CPU."""
    if module._forward_hooks or module._forward_pre_hooks:
        return None
    forms = module.__dict__.setdefault(_FORMS_ATTR, {})
    form = forms.get(columns)
    if form is None or not (torch.compiler.is_compiling() or form.current(module)):
        form = forms[columns] = _build_form(module, columns)
    return form.weight


def _build_form(module: nn.Module, columns: bool) -> _Form:
    if getattr(module, "bias", None) is not None:
        return _Form(None, ())
    if type(module) is nn.Linear:
        w = module.weight
        watched = (("weight", w, tensor_version(w)),)
        if w.dtype != torch.float32 or w.device.type != "cpu":
            return _Form(None, watched)
        weight = kernels.SparseWeight(w.detach())
    elif isinstance(module, PackedLinear) and not module.transposed:
        watched = tuple(
            (name, t, tensor_version(t))
            for name in ("qweight", "scale", "zero")
            if (t := getattr(module, name)) is not None
        )
        if module.qweight.device.type != "cpu":
            return _Form(None, watched)
        if module.int8_rows:
            weight = kernels.SparseWeight(module._int8_codes(), module.scale[:, 0].contiguous())
        elif module.w4_group is not None and module.w4_group % 32 == 0:
            zero = module._code_zero().contiguous()
            weight = kernels.SparseWeight(module.qweight, module.scale, zero, module.w4_group)
        else:
            return _Form(None, watched)
    else:
        return _Form(None, ())
    if columns:
        out = weight.w.shape[0]
        if out % (32 if weight.w.dtype == torch.uint8 else 16):
            return _Form(None, watched)
        weight = kernels.transpose_weight(weight)
    return _Form(weight, watched)


def build_sparse_weights(model: nn.Module) -> None:
    """Build every :class:`SparseGatedMLP`'s kernel operands now, eagerly (a compiled graph
    cannot check tensor versions, so it reuses what exists); call again after changing weights."""
    for module in model.modules():
        if isinstance(module, SparseGatedMLP):
            module.__dict__.pop(_FORMS_ATTR, None)
            for linear in (module.up_proj, module.down_proj):
                linear.__dict__.pop(_FORMS_ATTR, None)
            sparse_weight(module.up_proj), sparse_weight(module.down_proj, columns=True)


class SparseGatedMLP(nn.Module):
    """``down(act(gate(x)) · up(x))`` that multiplies only the active channels' ``up`` rows and
    ``down`` columns on decode (see the module docstring); the children are the MLP's own."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
            setattr(self, name, getattr(mlp, name))
        for name in ("config", "hidden_size", "intermediate_size"):
            if hasattr(mlp, name):
                setattr(self, name, getattr(mlp, name))
        for hooks in _HOOK_DICTS:
            getattr(self, hooks).update(getattr(mlp, hooks))

    def forward(self, x: Tensor) -> Tensor:
        a = self.act_fn(self.gate_proj(x))
        if self._sparse_ready(x, a):
            up, down = sparse_weight(self.up_proj), sparse_weight(self.down_proj, columns=True)
            one_group = not (up and down and up.group and down.group and up.group != down.group)
            if up is not None and down is not None and one_group:
                return kernels.sparse_mlp(x.contiguous(), a.contiguous(), up, down)
        return self.down_proj(a * self.up_proj(x))

    @staticmethod
    def _sparse_ready(x: Tensor, a: Tensor) -> bool:
        return (
            kernels_enabled()
            and 0 < a.numel() <= SPARSE_MAX_TOKENS * a.shape[-1]
            and x.dtype == a.dtype == torch.float32
            and x.device.type == "cpu"
            and (loaded_ops() is not None or not torch.compiler.is_compiling())
        )


def use_sparse_mlp(block: nn.Module, name: str = "mlp") -> SparseGatedMLP:
    """Put a :class:`SparseGatedMLP` in place of ``block.<name>`` (a gated MLP); idempotent."""
    mlp = getattr(block, name)
    if not isinstance(mlp, SparseGatedMLP):
        mlp = SparseGatedMLP(mlp)
        setattr(block, name, mlp)
    return mlp
