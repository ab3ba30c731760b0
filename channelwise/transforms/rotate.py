"""Exact orthogonal rotations of a Llama-family model (RMSNorm, pre-norm residual stream).

QuaRot (Ashkboos et al., arXiv 2404.00456), building on SliceGPT's computational invariance:
with every RMSNorm scale γ folded into the linears that read it, ``RMSNorm(x·Q) = RMSNorm(x)·Q``
for any orthogonal Q (‖x·Q‖ = ‖x‖), so the whole residual stream can be rotated by rewriting
weights only. Conventions (row vectors, ``y = x Wᵀ + b``, W stored ``(out, in)``):

- a linear *reading* a rotated input ``x·Q``: ``W ← W·Q`` (so ``(xQ)(WQ)ᵀ = x Wᵀ``);
- a linear *writing* into a rotated space: ``W ← Qᵀ·W``, ``b ← Qᵀ b`` (its output becomes y·Q).

LayerNorm families (OPT, GPT-2, GPT-NeoX) are refused: LayerNorm subtracts the mean of x, and
``mean(x·Q) ≠ mean(x)·Q``, so a rotation is not invariant there without SliceGPT's conversion
(baking the mean subtraction into the writers and replacing LayerNorm by RMSNorm), not built here.

Which linears read or write the residual comes from the adapter's subsets: a ``prev_kind="norm"``
subset reads it (after that norm); the ``attn_out`` and ``mlp_out`` subsets write it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from channelwise.adapters import (
    ModelAdapter,
    column_readers,
    linear_weight,
    norm_gain,
    set_norm_gain,
)
from channelwise.errors import ChannelwiseError, UnsupportedModelError
from channelwise.transforms.hadamard import hadamard_matrix, hadamard_transform

#: Adapter subsets whose linears write into the residual stream.
RESIDUAL_WRITERS = ("attn_out", "mlp_out")
_ONLINE_ATTR = "_channelwise_online_hadamard"


def require_rmsnorm(
    adapter: ModelAdapter, what: str = "a residual rotation", rotating: bool = True
) -> None:
    """Refuse families whose residual stream cannot be rotated exactly, with a one-line reason:
    LayerNorm (see the module docstring) or, when ``rotating``, the adapter's
    ``rotation_unsupported``."""
    if adapter.norm_type != "rmsnorm":
        raise UnsupportedModelError(
            f"{what} needs RMSNorm (Llama, Qwen2, Qwen3, Mistral, Phi-3); {adapter.family} uses "
            f"{adapter.norm_type}, whose mean subtraction is not rotation-invariant without a "
            "SliceGPT-style conversion to RMSNorm, which channelwise does not do"
        )
    if rotating and adapter.rotation_unsupported:
        raise UnsupportedModelError(
            f"{what} cannot be applied to {adapter.family}: {adapter.rotation_unsupported}"
        )


def _norm_readers(block: nn.Module, adapter: ModelAdapter) -> list[tuple[nn.Module, list]]:
    """``(norm, [linears reading it])`` for every norm subset of ``block``, the norm's
    column-only readers (a router) included."""
    readers: dict[str, list[nn.Module]] = {}  # one entry per norm, however many subsets read it
    for subset in adapter.subsets:
        if subset.prev_kind == "norm":
            readers.setdefault(subset.prev, []).extend(
                block.get_submodule(n) for n in subset.linears
            )
    return [
        (block.get_submodule(name), linears + column_readers(block.get_submodule(name)))
        for name, linears in readers.items()
    ]


def _writers(block: nn.Module, adapter: ModelAdapter) -> list[nn.Module]:
    """The linears writing the residual stream: the ``attn_out`` and ``mlp_out`` subsets (a
    mixture's per-expert ``mlp_out.<e>`` subsets)."""
    writers = {w: [s for s in adapter.subsets if s.role == w] for w in RESIDUAL_WRITERS}
    missing = [w for w, subsets in writers.items() if not subsets]
    if missing:
        raise UnsupportedModelError(
            f"{adapter.family} declares no subsets {missing}; cannot find the residual writers"
        )
    return [block.get_submodule(n) for w in RESIDUAL_WRITERS for s in writers[w] for n in s.linears]


def _set(weight: Tensor, value: Tensor) -> None:
    weight.copy_(value.to(weight.dtype))


def _untie_lm_head(model: nn.Module, adapter: ModelAdapter) -> nn.Module:
    """Give the LM head its own weight when it shares the embedding's, and record it in the
    config so a saved checkpoint reloads untied."""
    head = model.get_submodule(adapter.lm_head)
    tied = any(
        model.get_submodule(name).weight is head.weight for name in adapter.embeddings
    ) or bool(getattr(model.config, "tie_word_embeddings", False))
    if tied:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
        text_config = (
            model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
        )
        if text_config is not None:
            text_config.tie_word_embeddings = False
    return head


@torch.no_grad()
def fuse_norms(model: nn.Module, adapter: ModelAdapter) -> None:
    """Fold every RMSNorm γ into the linears reading it (``W ← W·diag(γ)``), then set γ = 1.

    The final norm folds into the LM head, which is first untied from the embeddings.
    Exact in float.
    """
    require_rmsnorm(adapter, "fusing norms", rotating=False)
    transposed = adapter.transposed_weights
    pairs = [pair for block in adapter.block_list(model) for pair in _norm_readers(block, adapter)]
    if adapter.final_norm is not None:
        pairs.append((model.get_submodule(adapter.final_norm), [_untie_lm_head(model, adapter)]))
    for norm, linears in pairs:
        gamma = norm_gain(norm).double()
        for linear in linears:
            weight = linear_weight(linear, transposed)
            _set(weight, weight.double() * gamma[None, :])
        set_norm_gain(norm, torch.ones_like(gamma))


def _check_fused(model: nn.Module, adapter: ModelAdapter) -> None:
    norms = [
        norm for block in adapter.block_list(model) for norm, _ in _norm_readers(block, adapter)
    ]
    if adapter.final_norm is not None:
        norms.append(model.get_submodule(adapter.final_norm))
    if any(not torch.all(norm_gain(norm) == 1) for norm in norms):
        raise ChannelwiseError(
            "rotating the residual needs every RMSNorm scale folded first; call fuse_norms"
        )


@torch.no_grad()
def rotate_residual(model: nn.Module, adapter: ModelAdapter, q: Tensor) -> None:
    """Rotate the residual stream by the orthogonal ``q`` ``(hidden, hidden)``; exact in float.

    Embeddings ``E ← E·Q``; readers (norm subsets, LM head) ``W ← W·Q``; writers (``attn_out``,
    ``mlp_out``) ``W ← Qᵀ·W``, ``b ← Qᵀ b``. Needs :func:`fuse_norms` first.
    """
    require_rmsnorm(adapter)
    _check_fused(model, adapter)
    transposed = adapter.transposed_weights
    q = q.double()
    hidden = model.get_submodule(adapter.embeddings[0]).weight.shape[1]
    if q.shape != (hidden, hidden):
        raise ChannelwiseError(
            f"the residual rotation must be {hidden}×{hidden} (the hidden size), got "
            f"{tuple(q.shape)}"
        )
    for name in adapter.embeddings:
        table = model.get_submodule(name).weight
        _set(table, table.double() @ q.to(table.device))
    readers = [model.get_submodule(adapter.lm_head)]
    writers = []
    for block in adapter.block_list(model):
        readers += [linear for _, linears in _norm_readers(block, adapter) for linear in linears]
        writers += _writers(block, adapter)
    if any(
        reader.weight is model.get_submodule(e).weight
        for reader in readers
        for e in adapter.embeddings
    ):
        raise ChannelwiseError("the LM head is tied to the embeddings; call fuse_norms first")
    for linear in readers:
        weight = linear_weight(linear, transposed)
        _set(weight, weight.double() @ q.to(weight.device))
    for linear in writers:
        weight = linear_weight(linear, transposed)
        qd = q.to(weight.device)
        _set(weight, qd.t() @ weight.double())
        if getattr(linear, "bias", None) is not None:
            _set(linear.bias, qd.t() @ linear.bias.double())


@torch.no_grad()
def rotate_heads_vo(block: nn.Module, adapter: ModelAdapter, h_d: Tensor) -> None:
    """Rotate each attention head's values by the orthogonal ``h_d`` ``(d, d)``; exact in float.

    v_proj rows of head h: ``W_h ← H_dᵀ·W_h`` (and bias), so ``v_h ← v_h·H_d``; attention mixes
    tokens, not channels, so each head's output is rotated the same way and o_proj columns of
    every query head undo it: ``W_o[:, h] ← W_o[:, h]·H_d``. Exact under grouped-query attention
    because every head uses the same ``H_d``.
    """
    transposed = adapter.transposed_weights
    v = block.get_submodule(adapter.attention["v"])
    o = block.get_submodule(adapter.attention["o"])
    h = h_d.double()
    d = h.shape[0]
    w_v = linear_weight(v, transposed)
    w_o = linear_weight(o, transposed)
    if w_v.shape[0] % d or w_o.shape[1] % d:
        raise UnsupportedModelError(
            f"head size {d} does not divide v_proj's {w_v.shape[0]} outputs or o_proj's "
            f"{w_o.shape[1]} inputs"
        )
    h = h.to(w_v.device)
    heads_v = w_v.double().reshape(-1, d, w_v.shape[1])
    _set(w_v, torch.einsum("ji,hjc->hic", h, heads_v).reshape(w_v.shape))
    if getattr(v, "bias", None) is not None:
        _set(v.bias, (v.bias.double().reshape(-1, d) @ h).reshape(-1))
    heads_o = w_o.double().reshape(w_o.shape[0], -1, d)
    _set(w_o, (heads_o @ h).reshape(w_o.shape))


class OnlineHadamard:
    """Forward pre-hook ``x ← x·H_n`` on a linear's input (``H_n = hadamard_matrix(n)``)."""

    def __init__(self, n: int) -> None:
        hadamard_matrix(n)  # fail now, not at the first forward, if n is not supported
        self.n = n

    def __call__(self, _module: nn.Module, args: tuple) -> tuple:
        return (hadamard_transform(args[0], self.n), *args[1:])

    def __repr__(self) -> str:
        return f"OnlineHadamard({self.n})"


def install_online_hadamard(module: nn.Module) -> OnlineHadamard:
    """Apply ``H_n`` to ``module``'s input at every call (n = in_features), running before any
    input quantizer (the hook is prepended). Its weight must carry ``W·H`` (see
    :func:`fold_online_hadamard`). Installing twice keeps one hook."""
    existing = online_hadamard(module)
    if existing is not None:
        return existing
    hook = OnlineHadamard(module.weight.shape[1])
    handle = module.register_forward_pre_hook(hook, prepend=True)
    setattr(module, _ONLINE_ATTR, (hook, handle))
    return hook


def online_hadamard(module: nn.Module) -> OnlineHadamard | None:
    installed = getattr(module, _ONLINE_ATTR, None)
    return installed[0] if installed is not None else None


@torch.no_grad()
def fold_online_hadamard(module: nn.Module) -> None:
    """``W ← W·H_n`` offline and ``x ← x·H_n`` online: the product is unchanged in float, and
    the linear's input (e.g. down_proj's, with its huge outlier channels) is spread out.
    ``module`` is an ``nn.Linear`` (``(out, in)`` weight)."""
    if online_hadamard(module) is not None:
        raise ChannelwiseError(f"{module} already has an online Hadamard; refusing to fold twice")
    weight = module.weight
    h = hadamard_matrix(weight.shape[1]).to(weight.device)
    _set(weight, weight.double() @ h)
    install_online_hadamard(module)
