"""Per-channel activation statistics of every linear input, collected block by block.

Linears of one subset read the same tensor, so each subset is observed once (through its first
linear). Statistics stream over calibration batches; nothing but the running values is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from channelwise.adapters import adapter_for
from channelwise.engine import BlockContext, run_blockwise


@dataclass
class ChannelStats:
    """Running per-channel min, max, abs-max and mean |x| over tokens; each ``(channels,)``."""

    min: torch.Tensor | None = None
    max: torch.Tensor | None = None
    absmax: torch.Tensor | None = None
    abssum: torch.Tensor | None = None
    tokens: int = 0

    def update(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()
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

    @property
    def absmean(self) -> torch.Tensor:
        return self.abssum / max(self.tokens, 1)


@dataclass
class ModelChannelStats:
    """``stats[subset][block]`` for every block and subset (``attn_in``, ``mlp_out``, …)."""

    linears: dict[str, str]
    stats: dict[str, list[ChannelStats]] = field(default_factory=dict)

    def absmax_matrix(self, subset: str) -> torch.Tensor:
        """``(n_blocks, channels)`` abs-max of the subset's input."""
        return torch.stack([s.absmax for s in self.stats[subset]])


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
