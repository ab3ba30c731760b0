"""Packing a compressed model: integer codes stored at their bit width, scales and zeros beside.

``pack_model`` turns every block linear whose weight a method rounded (and recorded the grid of,
:mod:`channelwise.quant.grid`) into a :class:`PackedLinear`. The codes are recovered exactly from
the fake-quantized weight, and the packed module dequantizes them with the same float32
arithmetic as the fake quantizer, ``(q − z)·s``, so its weight is bit-identical; packing checks
this and refuses a weight that moved off its grid.

Storage per linear: ``qweight`` ``(out, ceil(in·b/8))`` uint8 (codes offset to unsigned,
:mod:`channelwise.quant.packing`), ``scale`` float32 in the spec's block layout, ``zero``
for asymmetric specs (symmetric ones have none): uint8 integer offsets, or float32 minimums
``m`` for a ``zero_point: float`` spec (values ``q·s + m``, GGUF's Q4_1), and the bias. Scales
are stored float32, holding exactly what the quantizer computed (float16 values when the spec's
``scale_dtype`` is float16), so the packed model reproduces fake-quant. A token embedding a
recipe rounded packs the same way (:class:`PackedEmbedding`), with a tied LM head reading it.

The modules live in :mod:`channelwise.deploy.packed_modules`; on CPU float32 inputs they run the
integer kernels of :mod:`channelwise.kernels` (W8A8, W8A16, W4A16) through
:mod:`channelwise.deploy.kernel_call`, and ``use_kernels(False)`` selects the reference path
(dequantize, float GEMM), bit-identical to the fake-quant model. This module re-exports both.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from channelwise.adapters import ModelAdapter, adapter_for, linear_weight
from channelwise.deploy.dual_grained import PackedDualGrained
from channelwise.deploy.hooks import move_hooks
from channelwise.deploy.kernel_call import (
    DYNAMIC,
    int8_input_scale,
    kernels_enabled,
    use_kernels,
)
from channelwise.deploy.packed_modules import (
    PackedCodes,
    PackedEmbedding,
    PackedLinear,
    PackedTiedHead,
)
from channelwise.errors import PackingError
from channelwise.methods.registry import quantizes_weights
from channelwise.quant import quantize
from channelwise.quant.dual_grained import recorded_dual_grained
from channelwise.quant.grid import weight_grid
from channelwise.state import OFFLOAD_ATTR, RECIPE_ATTR

__all__ = [
    "DYNAMIC",
    "FLOAT_DTYPE_ATTR",
    "PackedCodes",
    "PackedEmbedding",
    "PackedLinear",
    "PackedTiedHead",
    "grid_keys",
    "int8_input_scale",
    "kernels_enabled",
    "narrow_floats",
    "narrowed",
    "pack_linear",
    "pack_model",
    "round_float_tensors_",
    "storage_key",
    "use_kernels",
]


def pack_linear(module: nn.Module, transposed: bool, where: str = "linear") -> PackedLinear:
    """The packed equivalent of ``module``, whose weight carries a recorded grid."""
    grid = weight_grid(module)
    if grid is None:
        raise PackingError(
            f"{where}: no recorded grid for its weight (it was not rounded by a weight "
            "quantizer, or by one that does not record its grid); nothing to pack"
        )
    weight = linear_weight(module, transposed).detach().float()
    bias = getattr(module, "bias", None)
    dual_grained = recorded_dual_grained(module)
    if dual_grained is not None:  # DGQ: its 4-bit codes, not the int8 rows they widen to
        packed = PackedDualGrained.from_dual_grained(dual_grained, bias, transposed)
    else:
        codes = quantize(weight, grid.qparams, grid.spec)
        packed = PackedLinear.from_codes(codes, grid.qparams, grid.spec, bias, transposed)
    if not torch.equal(packed.dequantized(), weight):
        worst = (packed.dequantized() - weight).abs().max().item()
        raise PackingError(
            f"{where}: the weight is not on its recorded {grid.spec.bits}-bit grid (off by up to "
            f"{worst:.3g}); a step changed it after it was quantized, so it cannot be packed"
        )
    return packed


def pack_model(model: nn.Module, adapter: ModelAdapter | None = None) -> list[str]:
    """Replace every block linear of a compressed ``model`` by a :class:`PackedLinear`, in place.

    If the model's recipe quantized weights, every block linear must carry a recorded grid (else
    :class:`PackingError`, before anything changes); a recipe without weight quantization packs
    no linear. A token embedding the recipe rounded is packed too, with an LM head tied to it.
    Forward hooks (input quantizers, online Hadamards) move to the packed modules. An offloaded
    model (:func:`channelwise.load_offloaded`) is checked the same way, but its block linears
    are packed one block at a time as :func:`channelwise.save_quantized` writes them.
    Returns the names of the packed modules.
    """
    adapter = adapter or adapter_for(model)
    recipe = getattr(model, RECIPE_ATTR, None)
    if recipe is None:
        raise PackingError("this model was not compressed by channelwise.quantize; nothing to pack")
    if not any(quantizes_weights(step.method) for step in recipe.steps):
        return _pack_embedding(model)
    todo = [
        (f"{adapter.block_path(index)}.{name}", block, name, module)
        for index, block in enumerate(adapter.block_list(model))
        for name, module in adapter.block_linears(block).items()
        if not isinstance(module, PackedLinear)
    ]
    for where, _block, _name, module in todo:
        if weight_grid(module) is None:
            raise PackingError(
                f"{where}: recipe '{recipe.name}' quantized it without recording the grid "
                "(GPTQ with act_order and dynamic groups forms non-contiguous groups: add "
                "static_groups: true); save it unpacked with --format fake"
            )
    weights = getattr(model, OFFLOAD_ATTR, None)
    if weights is not None:  # blocks on disk: each is packed as save_offloaded writes it
        weights.pack_on_save = True
        return [where for where, *_ in todo] + _pack_embedding(model)
    packed = [pack_linear(m, adapter.transposed_weights, where) for where, _, _, m in todo]
    for (_where, block, name, module), new in zip(todo, packed, strict=True):
        move_hooks(module, new)
        _set_submodule(block, name, new)
    return [where for where, *_ in todo] + _pack_embedding(model)


def _pack_embedding(model: nn.Module) -> list[str]:
    """Pack the token embedding if a recipe rounded it, and the LM head tied to it."""
    embedding = model.get_input_embeddings()
    grid = weight_grid(embedding)
    if grid is None:
        return []
    names = {id(module): name for name, module in model.named_modules()}
    name = names[id(embedding)]
    weight = embedding.weight.detach().float()
    scale = float(getattr(embedding, "scalar_embed_scale", 1.0))  # Gemma's √hidden
    packed = PackedEmbedding(*weight.shape, grid.spec, scale).to(weight.device)
    packed.load_codes(quantize(weight, grid.qparams, grid.spec), grid.qparams)
    if not torch.equal(packed.dequantized(), weight):
        raise PackingError(f"{name}: the embedding is not on its recorded grid; cannot pack it")
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    move_hooks(embedding, packed)
    _set_submodule(model, name, packed)
    if not tied:
        return [name]
    _set_submodule(model, names[id(head)], PackedTiedHead(packed, name))
    return [name, names[id(head)]]


FLOAT_DTYPE_ATTR = "_channelwise_float_dtype"
_GRID_BUFFERS = ("qweight", "scale", "zero", "group_scale", "group_zero")


def grid_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the packed grids (codes, scales, zero points)."""
    return {
        f"{name}.{buffer}"
        for name, module in model.named_modules()
        if isinstance(module, PackedCodes)
        for buffer in _GRID_BUFFERS
    }


def storage_key(tensor: Tensor) -> tuple[int, torch.device]:
    """The memory ``tensor`` views: tied tensors (an LM head and its embedding) share it."""
    return tensor.untyped_storage().data_ptr(), tensor.device


def round_float_tensors_(model: nn.Module, dtype: torch.dtype) -> int:
    """Round every saved float tensor that is not a packed grid (embeddings, norms, biases) to
    ``dtype`` and back, in place, so a checkpoint can store them in ``dtype`` losslessly (as the
    anchors keep their embeddings in fp16). Scales stay float32. Returns the elements rounded.

    A model whose blocks wait on disk (:func:`channelwise.load_offloaded`) must be packed first
    (:func:`pack_model`): its resident tensors are rounded here, each block's as
    :func:`channelwise.save_quantized` writes it (a value that does not fit raises there)."""
    if not dtype.is_floating_point:
        raise PackingError(f"float storage dtype must be a float type, not {dtype}")
    weights = getattr(model, OFFLOAD_ATTR, None)
    if weights is not None and not weights.pack_on_save:
        raise PackingError(
            "16-bit storage of the float tensors needs the packed format: pack_model(model) "
            "first, or save it with float32 storage"
        )
    grids, seen, todo = grid_keys(model), set(), []
    for key, tensor in model.state_dict().items():
        where = storage_key(tensor)
        if key in grids or not tensor.is_floating_point() or tensor.is_meta or where in seen:
            continue  # on meta: an offloaded block's, narrowed as it is saved
        seen.add(where)
        todo.append((tensor, narrowed(key, tensor, dtype)))  # all checked before any is written
    for tensor, narrow in todo:
        tensor.copy_(narrow.to(tensor.dtype))
    rounded = sum(tensor.numel() for tensor, _ in todo)
    setattr(model, FLOAT_DTYPE_ATTR, dtype)
    return rounded


def narrowed(key: str, tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor`` in ``dtype``; :class:`PackingError` naming ``key`` if a finite value overflows."""
    narrow = tensor.to(dtype)
    overflow = torch.isfinite(tensor) & ~torch.isfinite(narrow)
    if bool(overflow.any()):
        worst = tensor[overflow].abs().max().item()
        raise PackingError(
            f"{key}: {worst:.4g} does not fit in {dtype} (max {torch.finfo(dtype).max:.4g}); "
            "store the float tensors in bfloat16 or float32"
        )
    return narrow


def narrow_floats(
    state: dict[str, Tensor], dtype: torch.dtype | None, grids: set[str]
) -> dict[str, Tensor]:
    """``state`` with its float tensors outside the packed ``grids`` in ``dtype``: how a packed
    checkpoint stores them after :func:`round_float_tensors_`; unchanged when ``dtype`` is None."""
    if dtype is None:
        return state
    narrow = {key for key, value in state.items() if value.is_floating_point()} - grids
    return {key: narrowed(key, v, dtype) if key in narrow else v for key, v in state.items()}


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)
