"""GPTQ: second-order weight quantization with error feedback.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (arXiv 2210.17323).

For a linear with weight ``W`` ``(out, in)`` and calibration inputs ``x``, GPTQ minimises
``‖XWᵀ − XŴᵀ‖²`` one input column at a time: with ``H = (2/n) Σ xᵀx`` (plus damping
``λ = damp · mean diag H``) and ``U`` the upper Cholesky factor of ``H⁻¹``, column ``i`` is
rounded with the recipe's weight quantizer and its error is spread over the columns not yet
quantized, ``W[:, i+1:] −= ((w − q) / U_ii) · U[i, i+1:]``. Updates are applied lazily: within a
block of ``block_size`` columns, then to the rest of the matrix in one matrix product. Optionally
columns are processed in descending ``diag H`` ("act-order") and un-permuted at the end. Dead
inputs (``H_ii = 0``) get ``H_ii = 1`` and their weight columns are zeroed.

Scales: per output channel or per tensor → computed once from the weight before the loop; groups
along the input channels → computed from the current, error-updated weights when the loop reaches
the group's first column, or all up front from the original weight with ``static_groups``. Per
input channel, or groups of output channels inside each input column (the per-IC quantization of
AdaDim, Heo et al., arXiv 2309.15531) → each column is one quantization vector, its scales computed
from the current, error-updated column when the loop reaches it (``static_groups`` is refused
there: it has no meaning for scales that live inside one column).

Deviations from the paper and its reference code:

- Hessians are summed per batch in float32 and across batches in float64; the Cholesky factors
  and the column loop run in float64 (the reference uses float32 throughout). Rounding itself is
  the shared float32 quantizer (``quant.fake_quantize``), exactly as RTN rounds.
- Hessians use every calibration token of the block's inputs. With ``true_sequential`` they are
  observed after the block's earlier subsets are already quantized; the block's inputs come from
  the previous, already-quantized blocks. Linears of one adapter subset read the same input and
  share one Hessian and one factorization of it (computed in the Hessian's memory: a 7B
  ``down_proj``'s is 2.7 GiB); each observation pass stops once the observed linears have run.
- Dynamic group scales see the fully updated weights, including updates of the current lazy
  block still pending for the group's later columns; the reference reads the matrix without them
  when a group starts inside a block, which makes its result depend on ``block_size``. Ours does
  not.
- Per-channel/per-tensor scales are computed after dead columns are zeroed.
- ``act_order`` without ``static_groups`` forms groups over the *permuted* order (as the
  reference): the weights then lie on a grid of non-contiguous groups, which a packed format
  would need a group index for. ``static_groups`` keeps the recipe's contiguous groups.
- No per-column losses are reported; the calibration set is the protocol's (Emma), not C4.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from channelwise.adapters import Subset, linear_weight
from channelwise.engine import BlockContext
from channelwise.errors import ChannelwiseError, RecipeError
from channelwise.methods.registry import Method, register
from channelwise.quant import QParams, QuantSpec, compute_qparams, fake_quantize
from channelwise.quant.granularity import PerColumn, PerGroup, PerRow
from channelwise.quant.grid import record_grid


class GPTQArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    damp: float = Field(default=0.01, ge=0)
    block_size: int = Field(default=128, ge=1)
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = True


@register
class GPTQ(Method):
    name = "gptq"
    needs_calibration = True
    quantizes_weights = True
    distributed = True
    offloadable = True
    Args = GPTQArgs

    def check(self, model, adapter) -> None:
        super().check(model, adapter)
        check_granularity(
            self.recipe.weights.spec("weight"),
            f"recipe '{self.recipe.name}'",
            static_groups=self.args.static_groups,
        )

    def apply(self, ctx: BlockContext) -> None:
        spec = self.recipe.weights.spec("weight")
        subsets = ctx.adapter.subsets
        stages = [(s,) for s in subsets] if self.args.true_sequential else [subsets]
        for stage in stages:
            hessians = observe_hessians(ctx, stage)
            jobs = []
            for subset in stage:
                where = f"{ctx.adapter.block_path(ctx.index)}.{subset.linears[0]}"
                shared = SharedInverse(
                    hessians.pop(subset.name), self.args.damp, self.args.act_order, where
                )
                jobs += [(name, shared) for name in subset.linears]
            quantize_linears(ctx, jobs, spec, self._quantize_weight)

    def _quantize_weight(self, ctx: BlockContext, name: str, weight: Tensor, shared, spec):
        a = self.args
        return gptq_quantize(
            weight, shared(), spec, a.damp, a.block_size, a.act_order, a.static_groups,
            name=f"{ctx.adapter.block_path(ctx.index)}.{name}",
        )  # fmt: skip


def quantize_linears(
    ctx: BlockContext,
    jobs: list[tuple[str, object]],
    spec: QuantSpec,
    solve: Callable[[BlockContext, str, Tensor, object, QuantSpec], tuple[Tensor, QParams | None]],
) -> None:
    """Quantize each ``(linear name, curvature)`` of the block with ``solve(ctx, name, weight,
    curvature, spec) -> (weight, grid)``, writing the weight and recording its grid; the
    curvature is whatever ``solve`` takes (a Hessian, a :class:`SharedInverse`).

    Across processes (``ctx.group``) each linear is solved once, by its owner, and the weight
    and grid are broadcast to every process."""
    transposed = ctx.adapter.transposed_weights
    modules = [ctx.block.get_submodule(name) for name, _ in jobs]

    def job(index: int):
        name, hessian = jobs[index]
        weight = linear_weight(modules[index], transposed)
        quantized, qparams = solve(ctx, name, weight, hessian, spec)
        weight.copy_(quantized.to(weight.dtype))
        return qparams

    if ctx.group is None:
        grids = [job(index) for index in range(len(jobs))]
    else:
        owned = ctx.group.run_owned([lambda i=i: job(i) for i in range(len(jobs))])
        grids = []
        for index, module in enumerate(modules):
            owner = ctx.group.owner(index)
            ctx.group.broadcast_(module.weight, owner)
            mine = owned[index]
            if mine is not None:
                mine = QParams(mine.scale.cpu(), mine.zero_point.cpu())
            grids.append(ctx.group.broadcast_object(mine, owner))
    for module, qparams in zip(modules, grids, strict=True):
        if qparams is not None:
            record_grid(module, spec, qparams)


def check_granularity(spec: QuantSpec, where: str = "gptq", static_groups: bool = False) -> None:
    """Refuse ``static_groups`` with scales inside a column (per input channel / groups along
    output channels): those are computed per column as the loop reaches it, never up front."""
    if static_groups and is_per_column(spec):
        raise RecipeError(
            f"{where}: static_groups fixes groups along the input channels up front, but these "
            f"{spec.granularity} weight scales live inside each input column and are computed "
            "from the error-updated column as GPTQ reaches it (AdaDim per-IC, llm-methods.md §5); "
            "drop static_groups or use groups along input"
        )


def is_per_column(spec: QuantSpec) -> bool:
    """Whether scales live inside one input column (per-IC: ``PerColumn``, groups of outputs)."""
    g = spec.granularity
    return isinstance(g, PerColumn) or (isinstance(g, PerGroup) and g.along == "output")


def observe_hessians(ctx: BlockContext, subsets: tuple[Subset, ...]) -> dict[str, Tensor]:
    """``H = (2/n) Σ xᵀx`` ``(in, in)`` per subset over every calibration token, float64.

    The subset's first linear is observed (its linears share one input); each batch's forward
    stops as soon as every observed linear has seen it. Across processes the sums and token
    counts are reduced, so every process holds the Hessian of the whole calibration set.
    """
    first = {subset.linears[0]: subset.name for subset in subsets}
    sums: dict[str, Tensor] = {}
    counts = dict.fromkeys(first.values(), 0)

    def update(name: str, inputs: Tensor) -> None:
        rows = inputs.reshape(-1, inputs.shape[-1]).float()
        key = first[name]
        if key not in sums:
            sums[key] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64,
                                    device=rows.device)  # fmt: skip
        sums[key] += rows.T @ rows  # one float32 product at a time, summed in float64
        counts[key] += rows.shape[0]

    ctx.observe(tuple(first), update)
    if ctx.group is not None:
        for key in sorted(sums):
            ctx.group.all_reduce_(sums[key])
        totals = torch.tensor([counts[key] for key in sorted(counts)], dtype=torch.int64)
        counts = dict(zip(sorted(counts), ctx.group.all_reduce_(totals).tolist(), strict=True))
    if missing := sorted(set(first.values()) - set(sums)):
        raise ChannelwiseError(
            f"GPTQ: in block {ctx.index} the linears of subsets {missing} never ran on the "
            "calibration data; the model's adapter does not match its forward"
        )
    return {key: sums[key].mul_(2 / counts[key]) for key in sums}


def gptq_quantize(
    W: Tensor,
    H: Tensor | InverseHessian,
    spec: QuantSpec,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    *,
    name: str = "weight",
) -> tuple[Tensor, QParams | None]:
    """GPTQ-quantized copy of ``W`` ``(out, in)`` (float64) and the grid it lies on.

    ``H`` is the Hessian ``(in, in)``, or its :func:`invert_hessian` (then ``damp`` and
    ``act_order`` were applied there). The grid is ``qparams`` in ``spec``'s block layout on
    ``(out, in)``; it is ``None`` for ``act_order`` with dynamic groups, whose groups are not
    contiguous in ``W``.

    ``name`` labels the layer in errors. Raises :class:`RecipeError` for settings GPTQ cannot
    honour (``static_groups`` with per-column scales, a group size that does not divide the
    grouped dimension) and :class:`ChannelwiseError` if ``H + λI`` is not positive definite.
    """
    check_granularity(spec, static_groups=static_groups)
    spec.granularity.block_shape(*W.shape)  # group size must divide the grouped dimension
    if not isinstance(H, InverseHessian):
        H = invert_hessian(H.to(W.device), damp, act_order, name)
    W = W.detach().to(torch.float64, copy=True)
    W[:, H.dead.to(W.device)] = 0
    perm = H.perm.to(W.device)
    grid = _Grid(W, spec, perm, static_groups)
    permuted = not grid.contiguous
    Q = _quantize_columns(W[:, perm] if permuted else W, H.upper.to(W.device), grid, block_size)
    return (Q[:, torch.argsort(perm)] if permuted else Q), grid.final_qparams()


@dataclass(frozen=True)
class InverseHessian:
    """What GPTQ needs of one Hessian: the column order ``perm``, the ``dead`` inputs (zero
    diagonal) and ``upper``, ``U`` with ``UᵀU = (H + λI)⁻¹`` with rows and columns in ``perm``
    order. Linears that read one input share it."""

    perm: Tensor
    dead: Tensor
    upper: Tensor


def invert_hessian(
    H: Tensor, damp: float, act_order: bool, name: str, *, overwrite: bool = False
) -> InverseHessian:
    """:class:`InverseHessian` of ``H``: dead inputs get ``H_ii = 1``, ``act_order`` sorts the
    columns by descending ``diag H``. With ``overwrite`` a float64 ``H`` is used as the work
    space (its content is lost): the factorization then holds one ``(in, in)`` matrix, not four,
    which is what lets GPTQ run on a 7B model's 18,944-wide ``down_proj`` in 24 GB."""
    H = H.detach().to(torch.float64, copy=not overwrite)
    diagonal = torch.diagonal(H)
    dead = diagonal == 0
    diagonal[dead] = 1
    if act_order:
        perm = torch.argsort(diagonal, descending=True, stable=True)
        H.copy_(H.index_select(0, perm))
        H.copy_(H.index_select(1, perm))
    else:
        perm = torch.arange(H.shape[0], device=H.device)
    return InverseHessian(perm, dead, inverse_cholesky(H, damp, name, overwrite=True))


class SharedInverse:
    """One Hessian's :func:`invert_hessian`, computed by the first linear that asks for it and
    shared with the others that read the same input; the Hessian's memory becomes the factor's."""

    def __init__(self, hessian: Tensor, damp: float, act_order: bool, name: str) -> None:
        self._hessian: Tensor | None = hessian
        self._args = (damp, act_order, name)
        self._inverse: InverseHessian | None = None

    def __call__(self) -> InverseHessian:
        if self._inverse is None:
            hessian, self._hessian = self._hessian, None
            self._inverse = invert_hessian(hessian, *self._args, overwrite=True)
        return self._inverse


def inverse_cholesky(H: Tensor, damp: float, name: str, *, overwrite: bool = False) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹``, i.e. ``UᵀU = (H + λI)⁻¹``.

    ``λ = damp · mean diag H``; with ``overwrite`` the factor is computed in ``H``'s memory.
    Raises :class:`ChannelwiseError` naming ``name`` on failure.

    The paper's code factors, inverts and factors again (``n³/3 + 2n³/3 + n³/3`` flops). Here
    ``U`` is the inverse of the upper ``R`` with ``H + λI = RRᵀ``, which is ``J·L⁻¹·J`` for the
    lower Cholesky factor ``L`` of ``J(H + λI)J`` (``J`` reverses the order; reversing both
    axes of a contiguous matrix reverses its memory): one factorization and one triangular
    inverse, the same ``U`` to rounding; 1.6–1.85× faster at 1,536–8,192 inputs, 1.45× at
    18,944 (``benchmarks/gptq_inverse.py``).
    """
    if not overwrite:
        H = H.clone(memory_format=torch.contiguous_format)  # the reversal views it flat
    diagonal = torch.diagonal(H)
    diagonal += damp * diagonal.mean()
    info = torch.empty((), dtype=torch.int32, device=H.device)
    flat = H.view(-1)
    _reverse_(flat)
    torch.linalg.cholesky_ex(H, out=(H, info))
    if info.item() == 0:
        _invert_lower_triangular_(H)
        _reverse_(flat)
    if info.item() != 0 or not torch.isfinite(H.sum()):  # isfinite(H) would allocate n² more
        raise ChannelwiseError(
            f"GPTQ: the Hessian of {name} is not positive definite even with damp={damp}; "
            "use a larger damp (e.g. damp: 0.1) or more calibration samples"
        )
    return H


def _reverse_(flat: Tensor, chunk: int = 1 << 20) -> None:
    """Reverse a 1-D tensor in place, holding at most two ``chunk``-long temporaries."""
    size = flat.numel()
    for start in range(0, size // 2, chunk):
        length = min(chunk, size // 2 - start)
        front, back = flat[start : start + length], flat[size - start - length : size - start]
        saved = front.flip(0)
        front.copy_(back.flip(0))
        back.copy_(saved)


def _invert_lower_triangular_(L: Tensor, block: int = 512) -> None:
    """Invert a lower-triangular ``L`` (zeros above the diagonal) in place, by column blocks
    from the bottom right: with the trailing ``C`` already inverted, the block column under a
    diagonal block ``A`` becomes ``-C⁻¹·B·A⁻¹`` (temporaries of ``n × block``)."""
    n = L.shape[0]
    for start in reversed(range(0, n, block)):
        stop = min(start + block, n)
        diagonal = L[start:stop, start:stop]
        eye = torch.eye(stop - start, dtype=L.dtype, device=L.device)
        inverse = torch.linalg.solve_triangular(diagonal, eye, upper=False)
        if stop < n:
            below = L[stop:, start:stop]
            below.copy_(torch.mm(L[stop:, stop:], below).mm(inverse).neg_())
        diagonal.copy_(inverse)


class _Grid:
    """The quantizer of each column, in processing (possibly permuted) order."""

    def __init__(self, W: Tensor, spec: QuantSpec, perm: Tensor, static_groups: bool) -> None:
        group = spec.granularity
        # Per-IC: a column (out, 1) is its own quantization vector; scales come from it directly.
        self.per_column = is_per_column(spec)
        grouped = isinstance(group, PerGroup) and not self.per_column
        self.size = group.size if grouped else None
        self.dynamic = self.size is not None and not static_groups
        # A column is (out, 1): per-row scales on it are exactly one group's scales.
        self.spec = replace(spec, granularity=PerRow()) if self.size else spec
        self.perm = perm.tolist()
        fixed = not (self.dynamic or self.per_column)
        self.qparams = compute_qparams(W, spec) if fixed else None
        self.current = self.qparams
        self.contiguous = self.perm == sorted(self.perm)
        self.seen: list[QParams] = []  # dynamic groups and per-IC columns, in processing order

    def starts_group(self, j: int) -> bool:
        return self.dynamic and j % self.size == 0

    def set_group(self, columns: Tensor) -> None:
        self.current = compute_qparams(columns, self.spec)
        self.seen.append(self.current)

    def fake_quantize(self, column: Tensor, j: int) -> Tensor:
        if self.per_column:
            qparams = compute_qparams(column[:, None], self.spec)
            self.seen.append(qparams)
            return fake_quantize(column[:, None], self.spec, qparams)[:, 0]
        qparams = self.current
        if self.size is not None and not self.dynamic:
            g = slice(self.perm[j] // self.size, self.perm[j] // self.size + 1)
            qparams = QParams(self.qparams.scale[:, g], self.qparams.zero_point[:, g])
        return fake_quantize(column[:, None], self.spec, qparams)[:, 0]

    def final_qparams(self) -> QParams | None:
        """Every block's qparams in the spec's layout on the unpermuted ``(out, in)`` weight."""
        if self.qparams is not None:
            return self.qparams
        if self.dynamic and not self.contiguous:
            return None
        # Per-IC: column perm[j] was the j-th seen; dynamic groups are in column order.
        order = torch.argsort(torch.tensor(self.perm)) if self.per_column else None
        scale = torch.cat([q.scale for q in self.seen], dim=1)
        zero = torch.cat([q.zero_point for q in self.seen], dim=1)
        if order is not None:
            scale, zero = scale[:, order.to(scale.device)], zero[:, order.to(zero.device)]
        return QParams(scale, zero)


def _quantize_columns(W: Tensor, hinv: Tensor, grid: _Grid, block_size: int) -> Tensor:
    """The GPTQ loop over the columns of ``W`` (already permuted), lazy in blocks of columns."""
    Q = torch.zeros_like(W)
    cols = W.shape[1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        block = W[:, i1:i2].clone()
        errors = torch.zeros_like(block)
        for k in range(i2 - i1):
            j = i1 + k
            if grid.starts_group(j):
                grid.set_group(_current_columns(W, block, errors, hinv, i1, j, j + grid.size))
            q = grid.fake_quantize(block[:, k], j)
            Q[:, j] = q
            errors[:, k] = (block[:, k] - q) / hinv[j, j]
            block[:, k + 1 :] -= torch.outer(errors[:, k], hinv[j, j + 1 : i2])
        W[:, i2:] -= errors @ hinv[i1:i2, i2:]
    return Q


def _current_columns(W, block, errors, hinv, i1: int, j: int, stop: int) -> Tensor:
    """Columns ``j:stop`` as they stand now, with this block's pending updates applied."""
    i2 = i1 + block.shape[1]
    inside = block[:, j - i1 : min(stop, i2) - i1]
    if stop <= i2:
        return inside
    beyond = W[:, i2:stop] - errors[:, : j - i1] @ hinv[i1:j, i2:stop]
    return torch.cat([inside, beyond], dim=1)
