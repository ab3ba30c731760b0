"""Sparse decode kernels (``csrc/sparse.cpp``): a linear's product with only some of its rows,
or with an input that is zero outside some columns, on float32, W8 or W4 weights.

In a gated MLP ``down(act(gate(x)) · up(x))`` whose activation is mostly zero (CHESS, CATS),
only the ``up`` rows and ``down`` columns of the active channels ``idx`` matter:

* :func:`rows_linear` → ``(M, A)``: ``x @ W[idx].T``, reading only the indexed rows;
* :func:`cols_linear` → ``(M, N)``: ``h @ W[:, idx].T`` for the compact input ``h (M, A)`` (the
  input's values at ``idx``), reading ``W``'s columns as rows of its columns form
  (:func:`transpose_weight`), each contiguous;
* :func:`sparse_mlp`: both, with the active set found from the activation, in one call (one
  op: little Python per decode step, and a fixed output shape ``torch.compile`` can trace);
* :func:`sparse_input_linear`: the columns product with the active set found from the input;
* :func:`block_sparse_linear`: ``x @ W.T + b`` over the kept blocks of a block-pruned weight
  (:class:`BlockSparseWeight`, LPViT), for many rows at once (``csrc/block_sparse.cpp``).

Weights (:class:`SparseWeight`) are as the dense kernels take them (:mod:`channelwise.kernels.cpu`):
float32 ``(N, K)``; W8 int8 codes with a per-row scale; W4 codes two per byte along ``K``,
per-group ``scale`` and ``zero`` in code units. ``idx`` is int64, strictly increasing. Without
the extension each call takes the pure-torch reference (same products, summation order aside).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from channelwise.errors import KernelInputError, NonFiniteError
from channelwise.kernels.extension import load_ops
from channelwise.kernels.reference import dequantize_w4, unpack_int4


@dataclass(frozen=True)
class SparseWeight:
    """A weight as the sparse kernels read it; its kind follows ``w``'s dtype: float32,
    int8 codes (W8, per-row ``scale``) or uint8 (W4 codes two per byte, ``scale``/``zero`` per
    group of ``group`` along the input). Rows form: ``w (N, K)`` as stored; columns form: the
    transpose of :func:`transpose_weight`."""

    w: Tensor
    scale: Tensor | None = None
    zero: Tensor | None = None
    group: int = 0

    def operands(self) -> tuple:
        return self.w, self.scale, self.zero


def _call(name: str, *args) -> Tensor | None:
    ops = load_ops()
    if ops is None:
        return None
    try:
        return getattr(ops, name)(*args)
    except RuntimeError as error:  # the extension's TORCH_CHECKs: bad shapes, dtypes, indices
        message = str(error).strip().splitlines()[0]
        if "NaN or inf" in message:
            raise NonFiniteError("activation sparsity: NaN or inf activations") from None
        raise KernelInputError(f"sparse kernel {name}: {message}") from None


def _active_channels(tokens: Tensor) -> Tensor:
    """The columns of ``tokens (M, C)`` nonzero in at least one row, increasing (int64); NaN
    or inf refused, as the extension's scan does."""
    if not torch.isfinite(tokens).all():
        raise NonFiniteError("activation sparsity: NaN or inf activations")
    return tokens.ne(0).any(dim=0).nonzero().squeeze(1)


def rows_linear(x: Tensor, idx: Tensor, weight: SparseWeight) -> Tensor:
    """``x (M, K) @ W[idx].T`` → ``(M, A)``, reading only the indexed rows of ``W``."""
    y = _call("rows_mm", x, idx, *weight.operands(), weight.group)
    return y if y is not None else x @ rows_reference(weight, idx).T


def cols_linear(h: Tensor, idx: Tensor, weight_t: SparseWeight) -> Tensor:
    """``h (M, A) @ W[:, idx].T`` → ``(M, N)``: the product with an input nonzero only at
    ``idx`` (its values there ``h``), for ``W``'s columns form ``weight_t``."""
    y = _call("cols_mm", h, idx, *weight_t.operands(), weight_t.group)
    return y if y is not None else h @ columns_reference(weight_t)[idx]


def sparse_mlp(x: Tensor, a: Tensor, up: SparseWeight, down_t: SparseWeight) -> Tensor:
    """``down(a · up(x))`` for a gated MLP's activation ``a (..., N)`` (zero outside some
    channels) and its input ``x (..., K)``: only the rows of ``up`` and the columns of ``down``
    at the channels nonzero in some token are read, in one call. ``up`` and ``down_t`` share
    one group size."""
    y = _call("sparse_mlp", x, a, *up.operands(), *down_t.operands(), up.group or down_t.group)
    if y is not None:
        return y
    tokens = a.reshape(-1, a.shape[-1])
    idx = _active_channels(tokens)
    h = tokens[:, idx] * rows_linear(x.reshape(-1, x.shape[-1]), idx, up)
    return cols_linear(h, idx, down_t).view(*x.shape[:-1], -1)


def sparse_input_linear(x: Tensor, weight_t: SparseWeight) -> Tensor:
    """``x (..., K) @ W.T`` → ``(..., N)`` for an input zero outside some channels: only the
    columns of ``W`` at the channels nonzero in some token are read (``weight_t``: ``W``'s
    columns form), in one call."""
    y = _call("sparse_input_mm", x, *weight_t.operands(), weight_t.group)
    if y is not None:
        return y
    tokens = x.reshape(-1, x.shape[-1])
    idx = _active_channels(tokens)
    return cols_linear(tokens[:, idx], idx, weight_t).view(*x.shape[:-1], -1)


def sparsify(x: Tensor, threshold: Tensor) -> Tensor:
    """``x`` with the entries of magnitude below ``threshold`` zeroed (one value, or one per
    channel of the last dimension); a NaN or inf entry raises :class:`NonFiniteError`. One pass
    in the extension for a float32 CPU ``x``, else the same in torch ops.

    Inside a compiled graph it is torch ops, which inductor fuses into the kernel that made
    ``x`` (an extension op there is one more call per threshold: 90 per SmolLM2 CHESS step);
    NaN or inf are then refused by the sparse kernel that reads ``x`` (its active-channel scan),
    and propagate where no sparse kernel reads it."""
    threshold = threshold.to(x.device, x.dtype)
    if x.dtype == torch.float32 and x.device.type == "cpu" and not torch.compiler.is_compiling():
        if (ops := load_ops()) is not None:
            try:
                return ops.sparsify(x.contiguous(), threshold.reshape(-1).contiguous())
            except RuntimeError as error:
                if "NaN or inf" in str(error):
                    raise NonFiniteError("activation sparsity: NaN or inf activations") from None
                raise
    if not torch.compiler.is_compiling() and not torch.isfinite(x).all():
        raise NonFiniteError("activation sparsity: NaN or inf activations")
    return x.masked_fill(x.abs() < threshold, 0)


def rows_reference(weight: SparseWeight, idx: Tensor) -> Tensor:
    """The float32 rows ``W[idx]`` of a rows-form weight."""
    w = weight.w[idx]
    if idx.numel() == 0:
        return torch.zeros(0, w.shape[1] * (2 if w.dtype == torch.uint8 else 1), device=w.device)
    if w.dtype == torch.int8:
        return w.float() * weight.scale[idx, None]
    if w.dtype == torch.uint8:
        return dequantize_w4(w, weight.scale[idx], weight.zero[idx], weight.group)
    return w


def columns_reference(weight_t: SparseWeight) -> Tensor:
    """``Wᵀ (K, N)`` float32 from a columns-form weight."""
    wt = weight_t.w
    if wt.dtype == torch.int8:
        return wt.float() * weight_t.scale
    if wt.dtype == torch.uint8:
        k, blocks, _ = wt.shape
        codes = torch.stack((wt & 0xF, wt >> 4), dim=2)  # (K, blocks, half, 16)
        codes = codes.reshape(k, blocks * 32).float()
        expand = torch.arange(k, device=wt.device) // weight_t.group
        return (codes - weight_t.zero[expand]) * weight_t.scale[expand]
    return wt


def transpose_weight(weight: SparseWeight) -> SparseWeight:
    """The columns form of a rows-form weight ``(N, K)``: float32 or int8 codes transposed to
    ``(K, N)`` (the same per-row scale); W4 codes as ``(K, N / 32, 16)``: row ``k`` holds input
    ``k``'s codes (contiguous, so an inactive row is skipped whole), block ``b`` its output
    columns ``32b … 32b + 31``, byte ``j`` column ``32b + j`` (low nibble) and ``32b + j + 16``
    (high nibble); ``scale`` and ``zero`` transposed to ``(K / group, N)``."""
    w = weight.w
    if w.dtype != torch.uint8:
        return SparseWeight(w.T.contiguous(), weight.scale, None, weight.group)
    n = w.shape[0]
    if n % 32:
        raise KernelInputError(
            f"transpose_weight: {n} output rows; W4 columns need a multiple of 32"
        )
    codes = unpack_int4(w).reshape(n // 32, 2, 16, -1)  # (blocks, half, 16, K)
    packed_t = (codes[:, 0] | (codes[:, 1] << 4)).permute(2, 0, 1)  # (K, blocks, 16)
    return SparseWeight(
        packed_t.contiguous(), weight.scale.T.contiguous(), weight.zero.T.contiguous(), weight.group
    )


@dataclass(frozen=True)
class BlockSparseWeight:
    """A float32 weight ``W (N, K)`` kept as strips of 16 output rows cut into segments of
    ``width`` input columns, only the segments where a row of the strip is nonzero stored:
    ``blocks (B, width, 16)`` (segment ``b`` transposed: ``blocks[b, k, j] = W[16 s + j,
    width · columns[b] + k]`` for its strip ``s``), strip ``s`` owning ``blocks[starts[s] :
    starts[s + 1]]``; the last strip's rows past ``N`` are zero."""

    blocks: Tensor
    starts: Tensor
    columns: Tensor
    out_features: int
    in_features: int

    @classmethod
    def from_dense(cls, weight: Tensor, width: int) -> BlockSparseWeight:
        """Pack ``weight (N, K)``, keeping each strip's segments that hold a nonzero."""
        n, k = weight.shape
        if width <= 0 or k % width:
            raise KernelInputError(f"block-sparse: {k} input columns do not split into {width}")
        strips = -(-n // 16)
        padded = weight.detach().float().new_zeros(strips * 16, k)
        padded[:n] = weight.detach()
        segments = padded.reshape(strips, 16, k // width, width)
        kept = segments.ne(0).any(3).any(1)
        strip, column = kept.nonzero(as_tuple=True)
        starts = torch.zeros(strips + 1, dtype=torch.long, device=weight.device)
        starts[1:] = kept.sum(1).cumsum(0)
        blocks = segments[strip, :, column, :].transpose(1, 2).contiguous()
        return cls(blocks, starts, column.contiguous(), n, k)

    @property
    def width(self) -> int:
        return self.blocks.shape[1]

    @property
    def stored_fraction(self) -> float:
        """The share of the strips' segments stored (and multiplied)."""
        total = (self.starts.numel() - 1) * (self.in_features // self.width)
        return self.blocks.shape[0] / total if total else 0.0

    def dense(self) -> Tensor:
        """``W (N, K)`` rebuilt from the kept segments (zero elsewhere)."""
        strips = self.starts.numel() - 1
        counts = self.starts.diff()
        strip = torch.repeat_interleave(torch.arange(strips, device=counts.device), counts)
        segments = self.blocks.new_zeros(strips, self.in_features // self.width, self.width, 16)
        segments[strip, self.columns] = self.blocks
        return segments.permute(0, 3, 1, 2).reshape(strips * 16, -1)[: self.out_features]


def block_sparse_linear(x: Tensor, weight: BlockSparseWeight, bias: Tensor | None) -> Tensor:
    """``x (..., K) @ W.T + bias`` → ``(..., N)``, multiplying only the kept segments of
    ``W`` (the extension's AVX-512 kernel for float32 CPU inputs; else ``F.linear`` on the
    rebuilt weight, the reference)."""
    if x.shape[-1] != weight.in_features:
        raise KernelInputError(
            f"block-sparse: input has {x.shape[-1]} features, the weight {weight.in_features}"
        )
    if x.dtype == torch.float32 and x.device.type == "cpu" and weight.blocks.device.type == "cpu":
        operands = (weight.blocks, weight.starts, weight.columns, bias, weight.out_features)
        y = _call("block_sparse_mm", x.contiguous(), *operands)
        if y is not None:
            return y
    w = weight.dense().to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
