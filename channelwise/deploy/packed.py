"""Packed linears: integer codes stored at their bit width, scales and zero points beside them.

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

On CPU float32 inputs, :class:`PackedLinear` runs the integer kernels of
:mod:`channelwise.kernels` (W8A8, W8A16, W4A16); ``use_kernels(False)`` selects the reference
path (dequantize, float GEMM), which is bit-identical to the fake-quant model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from channelwise import kernels
from channelwise.adapters import ModelAdapter, adapter_for, linear_weight
from channelwise.errors import PackingError
from channelwise.quant import (
    PerGroup,
    PerRow,
    PerTensor,
    QParams,
    QuantSpec,
    dequantize,
    quantize,
)
from channelwise.quant.activation import InputQuantizer, input_quantizer
from channelwise.quant.dual_grained import DUAL_GRAINED_ATTR, recorded_dual_grained
from channelwise.quant.grid import GRID_ATTR, weight_grid
from channelwise.quant.packing import pack_codes, packed_size, unpack_codes

_KERNELS = {"on": True}


def use_kernels(enabled: bool) -> bool:
    """Route packed linears through the integer CPU kernels (default) or, with ``False``,
    through the reference path (dequantize, float GEMM: bit-identical to fake-quant). Returns
    the previous setting. The kernels differ from the reference only in float summation order
    (W8A16/W4A16) or sum exactly in int32 (W8A8)."""
    before = _KERNELS["on"]
    _KERNELS["on"] = bool(enabled)
    return before


def kernels_enabled() -> bool:
    """Whether packed (and 16-bit float) modules route through the CPU kernels now."""
    return _KERNELS["on"]


class PackedCodes(nn.Module):
    """Codes ``q`` of a ``(rows, cols)`` matrix packed along ``cols``, with their grid."""

    def __init__(self, rows: int, cols: int, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer(
            "qweight", torch.zeros(rows, packed_size(cols, spec.bits), dtype=torch.uint8)
        )
        grid_rows, grid_cols = spec.granularity.scale_shape(rows, cols)
        self.register_buffer("scale", torch.ones(grid_rows, grid_cols))
        self.zero: Tensor | None
        if spec.symmetric:
            self.zero = None
        else:  # an integer code offset (uint8), or a float minimum ``m`` (float32)
            zero_dtype = torch.float32 if spec.float_zero else torch.uint8
            self.register_buffer("zero", torch.zeros(grid_rows, grid_cols, dtype=zero_dtype))
        self._cols = cols
        g = spec.granularity
        #: int8 per-row symmetric codes: the W8A16 / W8A8 kernels
        self.int8_rows = spec.bits == 8 and spec.symmetric and isinstance(g, PerRow)
        #: 8-bit per-row codes with integer zero points: the W8A8 kernel only (zero in int32)
        self.uint8_rows = (
            spec.bits == 8 and not spec.symmetric and not spec.float_zero and isinstance(g, PerRow)
        )
        #: 8-bit per-row codes of either kind: an int8 input can go through the int8 GEMM
        self.int8_gemm = self.int8_rows or self.uint8_rows
        #: the group size of 4-bit codes grouped along the input: the W4A16 kernel
        self.w4_group = (
            g.size if spec.bits == 4 and isinstance(g, PerGroup) and g.along == "input" else None
        )
        self._kernel_calls: dict[bool, _KernelCall] = {}
        self._input_mode: float | str | None = None  # see build_kernel_operands

    def load_codes(self, codes: Tensor, qparams: QParams) -> None:
        """Store integer ``codes`` ``(rows, cols)`` in ``[qmin, qmax]`` and their grid."""
        self.qweight.copy_(pack_codes(codes.to(torch.int16) - self.spec.qmin, self.spec.bits))
        self.scale.copy_(qparams.scale)
        if self.zero is not None:
            self.zero.copy_(qparams.zero_point.to(self.zero.dtype))

    def codes(self, rows: Tensor | None = None) -> Tensor:
        """The integer codes ``(rows, cols)`` (or of the ``rows`` indexed), int16."""
        packed = self.qweight if rows is None else self.qweight[rows]
        return unpack_codes(packed, self.spec.bits, self._cols).to(torch.int16) + self.spec.qmin

    def qparams(self, rows: Tensor | None = None) -> QParams:
        scale = self.scale if rows is None else self.scale[rows]
        zero = torch.zeros_like(scale) if self.zero is None else self.zero
        if rows is not None and self.zero is not None:
            zero = zero[rows]
        return QParams(scale, zero.float())

    def dequantized(self, rows: Tensor | None = None) -> Tensor:
        """``(q − z)·s`` (or ``q·s + m`` with a float minimum) float32 (of the ``rows`` indexed,
        if given): bit-identical to the fake-quantized matrix. Row indexing needs a grid of
        whole rows (per row or row groups)."""
        return dequantize(self.codes(rows).float(), self.qparams(rows), self.spec)

    def matmul(
        self,
        x: Tensor,
        bias: Tensor | None = None,
        *,
        int8_input: bool = False,
        input_scale: float | None = None,
    ) -> Tensor:
        """``x Ŵᵀ + bias`` ``(..., rows)``: the integer kernels where they apply (CPU, float32
        ``x``; ``int8_input`` quantizes ``x`` to int8 into ``torch._int_mm``, per token or, given
        ``input_scale``, with that static scale), else the reference path (dequantize, float
        GEMM)."""
        if self._kernel_ready(x):
            call = self._kernel_call(int8_input)
            if call is not None:
                if int8_input:
                    return call.run(x, bias, input_scale)
                return call.run(x, bias)
        w = self.dequantized().to(x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    # --- integer kernels (float32 activations; CPU, and W8A8 on CUDA) --------------------------

    def _kernel_ready(self, x: Tensor) -> bool:
        return _KERNELS["on"] and x.dtype is torch.float32 and x.device.type in ("cpu", "cuda")

    def _kernel_call(self, int8_input: bool) -> _KernelCall | None:
        """The kernel and its weight operands, built once and reused while the buffers they were
        made from are unchanged (same tensors, same version): a decode step makes ~200 calls,
        and re-deriving the operands cost more than a small kernel itself. Under
        ``torch.compile`` the operands built eagerly (:meth:`build_kernel_operands`) are used
        unchecked: a compiled graph cannot read tensor versions."""
        call = self._kernel_calls.get(int8_input)
        if torch.compiler.is_compiling():
            if call is None:  # built in the graph: right, but re-derived at every call
                call = self._make_kernel_call(int8_input)
        elif call is None or not call.current(self._buffers):
            call = self._kernel_calls[int8_input] = self._make_kernel_call(int8_input)
        return call if call.kernel is not None else None

    def build_kernel_operands(self) -> None:
        """Derive the kernels' operands (the int8 view of the codes, zero points in code units,
        oneDNN's packed weight, a calibrated input scale as a number) now, outside any compiled
        graph, for :func:`channelwise.deploy.decode.compile_decode`; call it again after writing
        this module's buffers or its input quantizer's scale."""
        for int8_input in (False, True) if self.int8_gemm else (False,):
            self._kernel_calls[int8_input] = self._make_kernel_call(int8_input)
        quantizer = input_quantizer(self)
        self._input_mode = None if quantizer is None else int8_input_scale(quantizer)

    def _make_kernel_call(self, int8_input: bool) -> _KernelCall:
        buffers = self._buffers
        watched = tuple(
            (name, t, kernels.tensor_version(t))
            for name, t in buffers.items()
            if name in _WATCHED and t is not None
        )
        qweight, scale = buffers["qweight"], buffers["scale"]
        if qweight.device.type != "cpu" and not (int8_input and self.int8_gemm):
            return _KernelCall(None, (), watched)  # CUDA: only W8A8 (torch._int_mm) is real
        on_cpu = qweight.device.type == "cpu"  # oneDNN's packed weight, the VNNI kernel: CPU
        int8 = self._int8_codes() if self.int8_gemm else None
        if self.int8_rows:
            if int8_input:
                packed = kernels.prepack_int8(int8) if on_cpu else None
                unsigned = kernels.unsigned_codes(self._uint8_codes()) if on_cpu else None
                return _KernelCall(
                    kernels.w8a8_linear, (int8, scale[:, 0]), watched, w_packed=packed,
                    w_unsigned=unsigned,
                )  # fmt: skip
            return _KernelCall(kernels.w8a16_linear, (int8, scale[:, 0]), watched)
        if self.uint8_rows and int8_input:  # zero z − 128 in int32, as the codes
            zero = buffers["zero"][:, 0].to(torch.int32)
            unsigned = kernels.unsigned_codes(qweight, zero) if on_cpu else None
            return _KernelCall(
                kernels.w8a8_linear, (int8, scale[:, 0]), watched, w_zero=zero - 128,
                w_unsigned=unsigned,
            )  # fmt: skip
        if self.w4_group is not None and not int8_input:
            operands = (qweight, scale, self._code_zero(), self.w4_group)
            return _KernelCall(kernels.w4a16_linear, operands, watched)
        return _KernelCall(None, (), watched)

    def _int8_codes(self) -> Tensor:
        """8-bit codes as the int8 kernels take them (stored offset by 128 as uint8)."""
        return (self._buffers["qweight"] ^ 0x80).view(torch.int8)

    def _uint8_codes(self) -> Tensor:
        """Symmetric 8-bit codes offset by 128, as stored: the small-M W8A8 kernel's weight."""
        return self._buffers["qweight"]

    def _apply(self, fn, *args, **kwargs):
        self._kernel_calls.clear()  # .to()/.cuda() replace the buffers: drop the CPU operands now
        return super()._apply(fn, *args, **kwargs)

    def _code_zero(self) -> Tensor:
        """Zero points in unsigned code units (a symmetric 4-bit code is stored offset by 8). A
        float minimum ``m`` becomes ``−m/s``: the kernel's ``(q − z)·s`` is then ``q·s + m`` up to
        one float32 rounding of ``m``, on top of the kernel's own summation-order difference."""
        if self.zero is None:
            return torch.full_like(self.scale, -self.spec.qmin)
        if self.spec.float_zero:
            return -self.zero / self.scale
        return self.zero.float()


_WATCHED = ("qweight", "scale", "zero", "group_scale", "group_zero")
DYNAMIC = "dynamic"


def int8_input_scale(quantizer: InputQuantizer) -> float | str | None:
    """How the int8 GEMM can take over ``quantizer``'s rounding: :data:`DYNAMIC` (symmetric int8
    per token, min-max, no clipping: scales computed per call), a float (symmetric int8 per
    tensor with that calibrated scale and zero point 0: OutlierTune, DGQ), or None (it cannot;
    the input is fake-quantized and the product runs in float)."""
    spec, qparams = quantizer.spec, quantizer.qparams
    if (spec.bits, spec.symmetric) != (8, True):
        return None
    if qparams is None:
        plain = spec.range_method == "minmax" and spec.clip_ratio == 1.0
        return DYNAMIC if plain and isinstance(spec.granularity, PerRow) else None
    if torch.compiler.is_compiling():  # reading the calibrated scale would break the graph:
        return None  # PackedLinear uses the number build_kernel_operands read eagerly
    if not isinstance(spec.granularity, PerTensor) or qparams.scale.numel() != 1:
        return None
    scale = float(qparams.scale)
    if not 0 < scale < float("inf") or bool(qparams.zero_point.ne(0).any()):
        return None
    return scale


class _KernelCall:
    """``kernel(x, *operands, bias)``, with the buffers (and versions) the operands came from."""

    __slots__ = ("kernel", "operands", "watched", "keywords")

    def __init__(self, kernel, operands: tuple, watched: tuple, **keywords) -> None:
        self.kernel, self.operands, self.watched = kernel, operands, watched
        self.keywords = keywords

    def current(self, buffers: dict) -> bool:
        for name, tensor, version in self.watched:
            # an inference-mode buffer has no version: only its replacement is seen
            if buffers.get(name) is not tensor or kernels.tensor_version(tensor) != version:
                return False
        return True

    def run(self, x: Tensor, bias: Tensor | None, *extra) -> Tensor:
        return self.kernel(x, *self.operands, bias, *extra, **self.keywords)


class PackedLinear(PackedCodes):
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
        super().__init__(out_features, in_features, spec)
        self.in_features, self.out_features = in_features, out_features
        self.transposed = transposed
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_codes(
        cls, codes: Tensor, qparams: QParams, spec: QuantSpec, bias: Tensor | None, transposed: bool
    ) -> PackedLinear:
        """Pack integer ``codes`` ``(out, in)`` (``spec.code_dtype`` range) with their grid."""
        out_features, in_features = codes.shape
        packed = cls(in_features, out_features, spec, bias is not None, transposed)
        packed.load_codes(codes, qparams)
        if bias is not None:
            packed.bias.data.copy_(bias)
        return packed.to(codes.device)

    @property
    def weight(self) -> Tensor:
        w = self.dequantized()
        return w.t() if self.transposed else w

    def layout(self) -> dict:
        return {"kind": "linear", "transposed": self.transposed, "bias": self.bias is not None}

    def quantizes_input(self, quantizer: InputQuantizer, x: Tensor) -> bool:
        """Whether :meth:`forward` quantizes ``x`` itself, into the int8 GEMM against 8-bit
        per-row weights (symmetric, or with integer zero points): symmetric int8, dynamic per
        token or static per tensor (:func:`int8_input_scale`). Its codes equal the fake
        quantizer's."""
        return self._int8_input_mode(quantizer, x) is not None

    def _int8_input_mode(self, quantizer: InputQuantizer, x: Tensor) -> float | str | None:
        """:func:`int8_input_scale` where the int8 GEMM can take ``x``, else None. In a compiled
        graph a static scale is the number :meth:`build_kernel_operands` read eagerly."""
        if not self._int8_gemm_ready(x):
            return None
        if torch.compiler.is_compiling() and self._input_mode is not None:
            return self._input_mode
        return int8_input_scale(quantizer)

    def _int8_gemm_ready(self, x: Tensor) -> bool:
        """Whether the int8 GEMM can take ``x``. Inside a compiled graph only the small-M VNNI
        kernel can (decode; oneDNN's int8 linear is not traceable); elsewhere the module
        fake-quantizes ``x`` (the input-quantizer hook) into the weight-only kernel: the same
        products, summed in float instead of int32."""
        if not (self.int8_gemm and self._kernel_ready(x)):
            return False
        if torch.compiler.is_compiling():
            return x.device.type == "cpu" and kernels.small_m_kernel(x.numel() // x.shape[-1])
        return True

    def forward(self, x: Tensor) -> Tensor:
        quantizer = input_quantizer(self)
        mode = None if quantizer is None else self._int8_input_mode(quantizer, x)
        if mode is not None:
            scale = None if mode == DYNAMIC else mode
            return self.matmul(x, self.bias, int8_input=True, input_scale=scale)
        return self.matmul(x, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.spec.bits}, "
            f"{'symmetric' if self.spec.symmetric else 'asymmetric'}, {self.spec.granularity}"
        )


class PackedEmbedding(PackedCodes):
    """A token embedding ``(vocab, dim)`` stored as codes; a lookup dequantizes only its rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: QuantSpec) -> None:
        if spec.granularity.block_shape(2, embedding_dim)[0] != 1:
            raise PackingError(
                f"an embedding's grid must be per row or groups along the row, not "
                f"{spec.granularity}: a lookup dequantizes single rows"
            )
        super().__init__(num_embeddings, embedding_dim, spec)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    @property
    def weight(self) -> Tensor:
        return self.dequantized()

    def layout(self) -> dict:
        return {"kind": "embedding"}

    def forward(self, ids: Tensor) -> Tensor:
        return self.dequantized(ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)


class PackedTiedHead(nn.Module):
    """The LM head tied to a :class:`PackedEmbedding`: ``y = x Eᵀ``, the codes stored once."""

    def __init__(self, embedding: PackedEmbedding, embedding_name: str) -> None:
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # not a submodule: no second copy
        self.embedding_name = embedding_name
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.bias = None

    @property
    def weight(self) -> Tensor:
        return self.embedding.dequantized()

    def layout(self) -> dict:
        return {"kind": "tied_head", "embedding": self.embedding_name}

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding.matmul(x)


def pack_linear(module: nn.Module, transposed: bool, where: str = "linear") -> PackedLinear:
    """The packed equivalent of ``module``, whose weight carries a recorded grid."""
    grid = weight_grid(module)
    if grid is None:
        raise PackingError(
            f"{where}: no recorded grid for its weight (it was not rounded by a weight "
            "quantizer, or by one that does not record its grid); nothing to pack"
        )
    from channelwise.deploy.dual_grained import PackedDualGrained

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
    Forward hooks (input quantizers, online Hadamards) move to the packed modules.
    Returns the names of the packed modules.
    """
    from channelwise.compress import RECIPE_ATTR
    from channelwise.methods.registry import quantizes_weights

    adapter = adapter or adapter_for(model)
    recipe = getattr(model, RECIPE_ATTR, None)
    if recipe is None:
        raise PackingError("this model was not compressed by channelwise.quantize; nothing to pack")
    if not any(quantizes_weights(step.method) for step in recipe.steps):
        return _pack_embedding(model)
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
    packed = PackedEmbedding(*weight.shape, grid.spec).to(weight.device)
    packed.load_codes(quantize(weight, grid.qparams, grid.spec), grid.qparams)
    if not torch.equal(packed.dequantized(), weight):
        raise PackingError(f"{name}: the embedding is not on its recorded grid; cannot pack it")
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    _move_hooks(embedding, packed)
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
    anchors keep their embeddings in fp16). Scales stay float32. Returns the elements rounded."""
    if not dtype.is_floating_point:
        raise PackingError(f"float storage dtype must be a float type, not {dtype}")
    grids, seen, todo = grid_keys(model), set(), []
    for key, tensor in model.state_dict().items():
        where = storage_key(tensor)
        if key in grids or not tensor.is_floating_point() or where in seen:
            continue
        seen.add(where)
        narrow = tensor.to(dtype)
        overflow = torch.isfinite(tensor) & ~torch.isfinite(narrow)
        if bool(overflow.any()):  # checked for all before any is written
            worst = tensor[overflow].abs().max().item()
            raise PackingError(
                f"{key}: {worst:.4g} does not fit in {dtype} (max {torch.finfo(dtype).max:.4g}); "
                "store the float tensors in bfloat16 or float32"
            )
        todo.append((tensor, narrow))
    for tensor, narrow in todo:
        tensor.copy_(narrow.to(tensor.dtype))
    rounded = sum(tensor.numel() for tensor, _ in todo)
    setattr(model, FLOAT_DTYPE_ATTR, dtype)
    return rounded


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
        if attr.startswith("_channelwise_") and attr not in (GRID_ATTR, DUAL_GRAINED_ATTR):
            setattr(new, attr, value)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)
