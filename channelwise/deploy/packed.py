"""Packed linears: integer codes stored at their bit width, scales and zero points beside them.

``pack_model`` turns every block linear whose weight a method rounded (and recorded the grid of,
:mod:`channelwise.quant.grid`) into a :class:`PackedLinear`. The codes are recovered exactly from
the fake-quantized weight, and the packed module dequantizes them with the same float32
arithmetic as the fake quantizer, ``(q − z)·s``, so its weight is bit-identical; packing checks
this and refuses a weight that moved off its grid.

Storage per linear: ``qweight`` ``(out, ceil(in·b/8))`` uint8 (codes offset to unsigned,
:mod:`channelwise.quant.packing`), ``scale`` float32 in the spec's block layout, ``zero``
uint8 for asymmetric specs (symmetric ones have none), and the bias. Scales stay float32: fp16
scales would change the fake-quant result the packed model must reproduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from channelwise.adapters import ModelAdapter, adapter_for, linear_weight
from channelwise.errors import PackingError
from channelwise.quant import QParams, QuantSpec, dequantize, quantize
from channelwise.quant.grid import GRID_ATTR, weight_grid
from channelwise.quant.packing import pack_codes, packed_size, unpack_codes


class PackedLinear(nn.Module):
    """``y = x Ŵᵀ + b`` with ``Ŵ = (q − z)·s`` stored as packed codes ``q``.

    ``transposed`` marks a GPT-2 ``Conv1D`` it replaces: ``weight`` is then returned ``(in, out)``
    as that module stored it, so code reading weights through the adapter sees the same layout.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        bias: bool,
        transposed: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.spec, self.transposed = spec, transposed
        rows, cols = spec.granularity.scale_shape(out_features, in_features)
        self.register_buffer(
            "qweight",
            torch.zeros(out_features, packed_size(in_features, spec.bits), dtype=torch.uint8),
        )
        self.register_buffer("scale", torch.ones(rows, cols))
        self.zero: Tensor | None
        if spec.symmetric:
            self.zero = None
        else:
            self.register_buffer("zero", torch.zeros(rows, cols, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_codes(
        cls, codes: Tensor, qparams: QParams, spec: QuantSpec, bias: Tensor | None, transposed: bool
    ) -> PackedLinear:
        """Pack integer ``codes`` ``(out, in)`` (``spec.code_dtype`` range) with their grid."""
        out_features, in_features = codes.shape
        packed = cls(in_features, out_features, spec, bias is not None, transposed)
        packed.qweight.copy_(pack_codes(codes.to(torch.int16) - spec.qmin, spec.bits))
        packed.scale.copy_(qparams.scale)
        if packed.zero is not None:
            packed.zero.copy_(qparams.zero_point.to(torch.uint8))
        if bias is not None:
            packed.bias.data.copy_(bias)
        return packed.to(codes.device)

    def codes(self) -> Tensor:
        """The integer codes ``(out, in)`` in ``[qmin, qmax]``, int16."""
        unsigned = unpack_codes(self.qweight, self.spec.bits, self.in_features)
        return unsigned.to(torch.int16) + self.spec.qmin

    def qparams(self) -> QParams:
        zero = self.zero.float() if self.zero is not None else torch.zeros_like(self.scale)
        return QParams(self.scale, zero)

    def dequantized(self) -> Tensor:
        """``(q − z)·s`` ``(out, in)`` float32: bit-identical to the fake-quantized weight."""
        return dequantize(self.codes().float(), self.qparams(), self.spec)

    @property
    def weight(self) -> Tensor:
        w = self.dequantized()
        return w.t() if self.transposed else w

    def forward(self, x: Tensor) -> Tensor:
        w = self.dequantized().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        g = self.spec.granularity
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.spec.bits}, "
            f"{'symmetric' if self.spec.symmetric else 'asymmetric'}, {g}"
        )


def pack_linear(module: nn.Module, transposed: bool, where: str = "linear") -> PackedLinear:
    """The packed equivalent of ``module``, whose weight carries a recorded grid."""
    grid = weight_grid(module)
    if grid is None:
        raise PackingError(
            f"{where}: no recorded grid for its weight (it was not rounded by a weight "
            "quantizer, or by one that does not record its grid); nothing to pack"
        )
    weight = linear_weight(module, transposed).detach().float()
    codes = quantize(weight, grid.qparams, grid.spec)
    packed = PackedLinear.from_codes(
        codes, grid.qparams, grid.spec, getattr(module, "bias", None), transposed
    )
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
    nothing. Forward hooks (input quantizers, online Hadamards) move to the packed modules.
    Returns the names of the packed modules.
    """
    from channelwise.compress import RECIPE_ATTR
    from channelwise.methods.registry import quantizes_weights

    adapter = adapter or adapter_for(model)
    recipe = getattr(model, RECIPE_ATTR, None)
    if recipe is None:
        raise PackingError("this model was not compressed by channelwise.quantize; nothing to pack")
    if not any(quantizes_weights(step.method) for step in recipe.steps):
        return []
    todo = [
        (f"{adapter.blocks}.{index}.{name}", block, name, module)
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
    packed = [pack_linear(m, adapter.transposed_weights, where) for where, _, _, m in todo]
    for (_where, block, name, module), new in zip(todo, packed, strict=True):
        _move_hooks(module, new)
        _set_submodule(block, name, new)
    return [where for where, *_ in todo]


_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def _move_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` ``old``'s forward hooks (input quantizer, online rotations) and the
    channelwise attributes that track them; the hooks' removal handles keep working."""
    for attr in _HOOK_DICTS:
        setattr(new, attr, getattr(old, attr))
    for attr, value in vars(old).items():
        if attr.startswith("_channelwise_") and attr != GRID_ATTR:
            setattr(new, attr, value)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)
