"""Per-channel activation statistics of every linear input, collected block by block.

Linears of one subset read the same tensor, so each subset is observed once (through its first
linear). Statistics stream over calibration batches; nothing but the running values is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from channelwise.adapters import adapter_for
from channelwise.distributed import ProcessGroup
from channelwise.engine import BlockContext, run_blockwise
from channelwise.errors import ChannelwiseError


@dataclass
class ChannelStats:
    """Running per-channel min, max, abs-max and mean |x| over tokens; each ``(channels,)``.

    Percentiles come from a uniform reservoir sample of at most ``sample_rows`` token rows
    (seeded, so reproducible), which bounds memory whatever the calibration size; sampling is off
    (``sample_rows=0``) unless asked for.
    """

    min: torch.Tensor | None = None
    max: torch.Tensor | None = None
    absmax: torch.Tensor | None = None
    abssum: torch.Tensor | None = None
    tokens: int = 0
    sample_rows: int = 0
    sample: torch.Tensor | None = None
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    def update(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()
        if self.sample_rows > 0:
            self._reservoir(rows)
        lo, hi = rows.amin(dim=0), rows.amax(dim=0)
        absmax = torch.maximum(hi.abs(), lo.abs())
        abssum = rows.abs().sum(dim=0)
        if self.tokens == 0:
            self.min, self.max, self.absmax, self.abssum = lo, hi, absmax, abssum
        else:
            self.min = torch.minimum(self.min, lo)
            self.max = torch.maximum(self.max, hi)
            self.absmax = torch.maximum(self.absmax, absmax)
            self.abssum = self.abssum + abssum
        self.tokens += rows.shape[0]

    def all_reduce(self, group: ProcessGroup | None) -> None:
        """Combine the statistics of every calibration process (no-op without ``group``)."""
        if group is None:
            return
        if self.sample_rows > 0:
            raise ChannelwiseError(
                "percentile statistics (a reservoir sample) cannot be combined across processes"
            )
        if self.tokens == 0:
            raise ChannelwiseError("a calibration process observed no tokens")
        for name, op in (("min", "min"), ("max", "max"), ("absmax", "max"), ("abssum", "sum")):
            group.all_reduce_(getattr(self, name), op)
        self.tokens = int(group.all_reduce_(torch.tensor([self.tokens], dtype=torch.int64)).item())

    @property
    def absmean(self) -> torch.Tensor:
        return self.abssum / max(self.tokens, 1)

    def abs_percentile(self, q: float) -> torch.Tensor:
        """Per-channel ``q``-th percentile (0–100) of |x| over the sampled tokens, ``(C,)``."""
        if self.sample_rows <= 0:
            raise ValueError("percentiles need a reservoir: create ChannelStats(sample_rows=N)")
        if self.sample is None:
            raise ValueError("no statistics collected yet")
        return torch.quantile(self.sample.abs(), q / 100.0, dim=0)

    def _reservoir(self, rows: torch.Tensor) -> None:
        """Algorithm R, vectorized over a batch of rows (Vitter 1985)."""
        rows = rows.detach().cpu()
        seen = self.tokens
        if self.sample is None:
            self.sample = rows[: self.sample_rows].clone()
            rest, seen = rows[self.sample_rows :], rows[: self.sample_rows].shape[0]
        elif self.sample.shape[0] < self.sample_rows:
            room = self.sample_rows - self.sample.shape[0]
            self.sample = torch.cat([self.sample, rows[:room]])
            rest, seen = rows[room:], seen + min(room, rows.shape[0])
        else:
            rest = rows
        if rest.shape[0] == 0:
            return
        positions = torch.arange(seen, seen + rest.shape[0], dtype=torch.float64)
        slots = (
            torch.rand(rest.shape[0], generator=self.generator, dtype=torch.float64)
            * (positions + 1)
        ).long()
        keep = slots < self.sample_rows
        self.sample[slots[keep]] = rest[keep]


@dataclass
class ModelChannelStats:
    """``stats[subset][block]`` for every block and subset (``attn_in``, ``mlp_out``, …)."""

    linears: dict[str, str]
    stats: dict[str, list[ChannelStats]] = field(default_factory=dict)

    def absmax_matrix(self, subset: str) -> torch.Tensor:
        """``(n_blocks, channels)`` abs-max of the subset's input; where blocks differ in width
        (Swin's stages), a narrower block's missing channels are NaN."""
        rows = [s.absmax for s in self.stats[subset]]
        width = max(row.numel() for row in rows)
        nan = float("nan")
        return torch.stack([F.pad(row, (0, width - row.numel()), value=nan) for row in rows])


def collect_channel_stats(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8, progress: bool = True
) -> ModelChannelStats:
    """Observe the input of every subset of every block on ``input_ids`` ``(n, seq)``."""
    adapter = adapter_for(model)
    first = {subset.name: subset.linears[0] for subset in adapter.subsets}
    result = ModelChannelStats(linears=first, stats={name: [] for name in first})
    by_linear = {linear: name for name, linear in first.items()}

    def block_fn(ctx: BlockContext) -> None:
        current = {name: ChannelStats() for name in first}
        ctx.observe(tuple(by_linear), lambda linear, x: current[by_linear[linear]].update(x))
        for name, stats in current.items():
            result.stats[name].append(stats)

    with torch.no_grad():
        run_blockwise(model, adapter, input_ids, block_fn, batch_size=batch_size, progress=progress)
    return result
