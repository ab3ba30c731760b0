"""The packed modules: codes stored at their bit width with their grid, read back bit-identical.

:class:`PackedCodes` holds the codes of a ``(rows, cols)`` matrix and de-quantizes them with the
fake quantizer's float32 arithmetic; :class:`PackedLinear` and :class:`PackedEmbedding` are a
linear and a token embedding on it, :class:`PackedTiedHead` an LM head reading the embedding's
codes. Products go through the integer kernels where they apply
(:class:`~channelwise.deploy.kernel_call.KernelDispatch`), else dequantize + float GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from channelwise.deploy.kernel_call import DYNAMIC, KernelDispatch
from channelwise.deploy.sparse import sparse_input_forward
from channelwise.errors import PackingError
from channelwise.quant import QParams, QuantSpec, dequantize
from channelwise.quant.activation import InputQuantizer, input_quantizer
from channelwise.quant.packing import pack_codes, packed_size, unpack_codes


class PackedCodes(KernelDispatch):
    """Codes ``q`` of a ``(rows, cols)`` matrix packed along ``cols``, with their grid."""

    def __init__(self, rows: int, cols: int, spec: QuantSpec) -> None:
        super().__init__(spec)
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
        token or static per tensor (:func:`~channelwise.deploy.kernel_call.int8_input_scale`).
        Its codes equal the fake quantizer's."""
        return self._int8_input_mode(quantizer, x) is not None

    def forward(self, x: Tensor) -> Tensor:
        y = sparse_input_forward(self, x)  # a marked linear on decode: the active columns only
        if y is not None:
            return y
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
    """A token embedding ``(vocab, dim)`` stored as codes; a lookup dequantizes only its rows.

    ``output_scale`` multiplies each looked-up row, as a scaled embedding does (Gemma's √hidden,
    ``scalar_embed_scale``); a tied LM head reads the unscaled table.
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, spec: QuantSpec, output_scale: float = 1.0
    ) -> None:
        if spec.granularity.block_shape(2, embedding_dim)[0] != 1:
            raise PackingError(
                f"an embedding's grid must be per row or groups along the row, not "
                f"{spec.granularity}: a lookup dequantizes single rows"
            )
        super().__init__(num_embeddings, embedding_dim, spec)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.output_scale = float(output_scale)

    @property
    def weight(self) -> Tensor:
        return self.dequantized()

    def layout(self) -> dict:
        if self.output_scale == 1.0:
            return {"kind": "embedding"}
        return {"kind": "embedding", "output_scale": self.output_scale}

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.dequantized(ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)
        if self.output_scale == 1.0:
            return rows
        # As transformers' scaled embeddings do: the scale as a tensor of the rows' dtype.
        return rows * torch.tensor(self.output_scale, dtype=rows.dtype, device=rows.device)


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
