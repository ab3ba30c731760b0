"""Activation sparsity at run time: the threshold hooks, and decode through the sparse kernels.

:func:`install_threshold_hook` zeroes the small entries of a module's input or output (the
semantics every path computes). Two module kinds then skip the zeroed channels' weights on
decode (:mod:`channelwise.kernels.sparse`):

* a gated MLP whose ``act_fn`` is hooked (CHESS, CATS) becomes a :class:`SparseGatedMLP`;
* a linear whose input is hooked (TEAL's every linear, CHESS's ``q_proj``/``o_proj``) is marked
  by :func:`mark_sparse_input`: a float ``nn.Linear`` becomes a :class:`SparseInputLinear`, and a
  packed linear reads the mark (packing carries it over); on up to :data:`SPARSE_MAX_TOKENS`
  tokens either multiplies only the weight columns of the channels nonzero in its input.

Both keep the state-dict keys, the forward hooks and the dense result (up to float summation
order).

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

from channelwise.deploy.hooks import move_hooks
from channelwise.deploy.kernel_call import KernelDispatch, kernels_enabled
from channelwise.kernels import sparse as kernels
from channelwise.kernels.cpu import tensor_version
from channelwise.kernels.extension import loaded_ops

#: Up to this many tokens per call the MLP takes the sparse kernels (decode, small batches).
SPARSE_MAX_TOKENS = 4
#: The threshold hook's handle on a module (packing carries ``_channelwise_`` attributes over).
SPARSITY_HOOK_ATTR = "_channelwise_sparsity_hook"
#: The threshold that hook reads, on the same module (carried over with it).
SPARSITY_THRESHOLD_ATTR = "_channelwise_sparsity_threshold"
#: Set on a linear whose input is hooked: it may take the sparse-input kernel.
SPARSE_INPUT_ATTR = "_channelwise_sparse_input"
_FORMS_ATTR = "_sparse_forms"  # the cached forms: not carried to a packed replacement


def install_threshold_hook(module: nn.Module, threshold: Tensor, on_output: bool) -> None:
    """Zero the entries of ``module``'s output (or first input) whose magnitude is below
    ``threshold`` (a scalar, or one value per last-dimension channel; read at every call, so it
    may be changed in place). NaN or inf activations raise :class:`NonFiniteError`; in a
    compiled graph the thresholding is fused torch ops and the sparse kernel that reads them
    refuses them (a RuntimeError naming them), where no sparse kernel reads them they propagate.

    The threshold is kept on the module (:data:`SPARSITY_THRESHOLD_ATTR`), not in the hook's
    closure: a compiled graph then reaches it as a plain module attribute, where a closure
    cell of a hook is a long chain dynamo re-walks on every call (90 thresholds of SmolLM2's
    CHESS cost ~0.4 ms per decode step that way)."""
    remove_threshold_hook(module)
    setattr(module, SPARSITY_THRESHOLD_ATTR, threshold)
    if on_output:
        handle = module.register_forward_hook(_sparsify_output)
    else:
        handle = module.register_forward_pre_hook(_sparsify_input)
    setattr(module, SPARSITY_HOOK_ATTR, handle)


def _sparsify_output(module: nn.Module, _args: tuple, out: Tensor) -> Tensor:
    return kernels.sparsify(out, getattr(module, SPARSITY_THRESHOLD_ATTR))


def _sparsify_input(module: nn.Module, args: tuple) -> tuple:
    return (kernels.sparsify(args[0], getattr(module, SPARSITY_THRESHOLD_ATTR)), *args[1:])


def remove_threshold_hook(module: nn.Module) -> None:
    handle = getattr(module, SPARSITY_HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(module, SPARSITY_HOOK_ATTR)
    module.__dict__.pop(SPARSITY_THRESHOLD_ATTR, None)


def _only_own_hooks(module: nn.Module) -> bool:
    """Whether ``module``'s only hook is its own sparsity pre-hook (or it has none): any other
    (an input quantizer, an online Hadamard) must run, so the kernels cannot stand in."""
    if module._forward_hooks:
        return False
    own = getattr(module, SPARSITY_HOOK_ATTR, None)
    return all(own is not None and key == own.id for key in module._forward_pre_hooks)


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
    None where the kernels cannot stand in for its forward: a hook other than its own sparsity
    pre-hook (an input quantizer, an online Hadamard), a grid other than W8 per row or W4 in
    groups of a multiple of 32 along the input, or a weight not float32 on the CPU."""
    forms = module.__dict__.setdefault(_FORMS_ATTR, {})
    if torch.compiler.is_compiling():  # what build_sparse_weights left (hooks checked there)
        form = forms.get(columns)
        return None if form is None else form.weight
    if not _only_own_hooks(module):
        forms.pop(columns, None)
        return None
    form = forms.get(columns)
    if form is None or not form.current(module):
        form = forms[columns] = _build_form(module, columns)
    return form.weight


def _build_form(module: nn.Module, columns: bool) -> _Form:
    bias = getattr(module, "bias", None)
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"):
        return _Form(None, ())
    if type(module) in (nn.Linear, SparseInputLinear):
        w = module.weight
        watched = (("weight", w, tensor_version(w)),)
        if w.dtype != torch.float32 or w.device.type != "cpu":
            return _Form(None, watched)
        weight = kernels.SparseWeight(w.detach())
    elif isinstance(module, KernelDispatch) and not getattr(module, "transposed", True):
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
    """Build the sparse kernels' operands of every :class:`SparseGatedMLP` and sparse-input
    linear now, eagerly (a compiled graph cannot check tensor versions, so it reuses what
    exists); call again after changing weights."""
    for module in model.modules():
        if isinstance(module, SparseGatedMLP):
            for linear in (module.up_proj, module.down_proj):
                linear.__dict__.pop(_FORMS_ATTR, None)
            sparse_weight(module.up_proj), sparse_weight(module.down_proj, columns=True)
        elif getattr(module, SPARSE_INPUT_ATTR, False):
            module.__dict__.pop(_FORMS_ATTR, None)
            sparse_weight(module, columns=True)


def _decode_ready(x: Tensor, width: int) -> bool:
    """Whether a call on ``x`` may take the sparse kernels: float32 CPU, up to
    :data:`SPARSE_MAX_TOKENS` tokens, kernels on (inside a compiled graph: only the extension's
    ops, whose output shapes are fixed)."""
    return (
        kernels_enabled()
        and 0 < x.numel() <= SPARSE_MAX_TOKENS * width
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and (loaded_ops() is not None or not torch.compiler.is_compiling())
    )


def mark_sparse_input(module: nn.Module) -> None:
    """Let the linear ``module`` (whose input a threshold hook zeroes) take the sparse-input
    kernel on decode: a float ``nn.Linear`` becomes a :class:`SparseInputLinear` (same
    parameters, hooks and keys); a packed linear reads the mark in its forward."""
    setattr(module, SPARSE_INPUT_ATTR, True)
    if type(module) is nn.Linear:
        module.__class__ = SparseInputLinear


def sparse_input_forward(module: nn.Module, x: Tensor) -> Tensor | None:
    """``module(x)`` through the sparse-input kernel where it applies (a marked linear, a
    decode-sized float32 CPU input, operands the kernels read); else None (the dense path)."""
    if not (getattr(module, SPARSE_INPUT_ATTR, False) and _decode_ready(x, x.shape[-1])):
        return None
    weight_t = sparse_weight(module, columns=True)
    if weight_t is None:
        return None
    y = kernels.sparse_input_linear(x.contiguous(), weight_t)
    return y if module.bias is None else y + module.bias


class SparseInputLinear(nn.Linear):
    """An ``nn.Linear`` whose input a threshold hook zeroes: on decode it multiplies only the
    weight columns of the nonzero input channels (:func:`sparse_input_forward`)."""

    def forward(self, x: Tensor) -> Tensor:
        y = sparse_input_forward(self, x)
        return y if y is not None else super().forward(x)


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
        move_hooks(mlp, self)

    def forward(self, x: Tensor) -> Tensor:
        a = self.act_fn(self.gate_proj(x))
        if _decode_ready(a, a.shape[-1]) and x.dtype == torch.float32:
            up, down = sparse_weight(self.up_proj), sparse_weight(self.down_proj, columns=True)
            one_group = not (up and down and up.group and down.group and up.group != down.group)
            no_bias = self.up_proj.bias is None and self.down_proj.bias is None
            if up is not None and down is not None and one_group and no_bias:
                return kernels.sparse_mlp(x.contiguous(), a.contiguous(), up, down)
        return self.down_proj(a * self.up_proj(x))


def use_sparse_mlp(block: nn.Module, name: str = "mlp") -> SparseGatedMLP:
    """Put a :class:`SparseGatedMLP` in place of ``block.<name>`` (a gated MLP); idempotent."""
    mlp = getattr(block, name)
    if not isinstance(mlp, SparseGatedMLP):
        mlp = SparseGatedMLP(mlp)
        setattr(block, name, mlp)
    return mlp
