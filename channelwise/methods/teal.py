"""TEAL: magnitude activation sparsity on the input of every linear, allocated per block.

Liu et al., "Training-Free Activation Sparsity in Large Language Models", ICLR 2025,
arXiv 2408.14690 (official code: FasterDecoding/TEAL).

Every block linear (``q/k/v/o_proj``, ``gate/up/down_proj``) has its input entries of magnitude
below a threshold zeroed, so on decode it reads only the weight columns of the surviving input
channels (:func:`channelwise.deploy.sparse.mark_sparse_input`). Each linear has its own sparsity
level ``S_p`` and threshold (the ``S_p``-quantile of its input's magnitude on calibration data),
even where inputs are shared (q/k/v read one tensor, gate/up another). The block's target
``sparsity`` is the parameter-weighted mean ``Σ n_p S_p / Σ n_p`` over its 7 linears, reached by

* ``allocation: greedy`` (the paper's block-wise greedy): start from ``S = 0``; at each step try
  raising each linear's level by ``step · n_q / n_p`` (every candidate adds the same number of
  zeroed weights), keep the one whose block output moves least from the dense output (mean
  squared error on the first ``greedy_length`` tokens of ``greedy_samples`` calibration
  sequences), until the mean reaches the target; the last step is kept only if it lands nearer
  the target than the one before;
* ``allocation: uniform``: every linear at ``S_p = sparsity``.

Gated-MLP families only, like CHESS (Phi-3's fused projections as their split parts, each with
its own threshold).

Deviations and ambiguities:

- Thresholds are exact magnitude quantiles of an even subsample (≤ 2¹⁸ values per tensor) of the
  calibration inputs; the official code reads the inverse CDF at ``0.5 + S/2`` of a signed
  10,000-bin histogram, assuming a symmetric distribution. Entries below the threshold are
  zeroed (``|x| < t``), the official code keeps ``|x| > t``: they differ only on ties.
- Calibration is the protocol's (Emma, 128 × 512 tokens), not 20k tokens of Alpaca. The greedy
  search scores on far fewer tokens, for time on a CPU: by default the first 128 tokens of 2
  sequences (each candidate is a forward of the block; SmolLM2 at 50% makes ~750 per block).
  A causal block's first tokens do not depend on the rest, so the block runs on those tokens
  alone (every keyword tensor cut along its sequence dimensions).
- Each block is calibrated on the outputs of the blocks already sparsified (as every step here),
  where the official greedy search feeds each layer dense inputs.
- The greedy error is the mean squared error over every token, each of them sparsified; the
  official code sparsifies the last half of each sequence and scores the last quarter. Our
  perplexity evaluation sparsifies every token, prefill included (the official evaluation
  sparsifies half of each window), a stricter setting.
- Parameter weights are the linears' true sizes (the shipped tables of the official code used
  other k/v weights than its current code; see its ``greedyopt.py``).
- The target is met per block, so every block ends at the same mean sparsity (as the official
  lookup of the nearest table row does).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, Field
from torch import Tensor, nn

from channelwise.adapters import linear_weight
from channelwise.deploy.sparse import install_threshold_hook, mark_sparse_input
from channelwise.engine import BlockContext, hidden_state
from channelwise.errors import ChannelwiseError
from channelwise.methods.chess import SparsityArgs, gated_mlp_paths
from channelwise.methods.registry import Method, register

#: The 7 sparsified linears of a block and the linear whose input each one shares.
LINEARS = {
    "self_attn.q_proj": "self_attn.q_proj",
    "self_attn.k_proj": "self_attn.q_proj",
    "self_attn.v_proj": "self_attn.q_proj",
    "self_attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.gate_proj",
    "mlp.down_proj": "mlp.down_proj",
}
#: Magnitudes kept per input tensor for its quantiles.
SAMPLE = 1 << 18
#: No linear's level goes above this (all of its input zeroed would cut the block's path).
MAX_LEVEL = 0.99


class TealArgs(SparsityArgs):
    allocation: Literal["greedy", "uniform"] = "greedy"
    step: float = Field(default=0.05, gt=0.0, lt=1.0)
    greedy_samples: int = Field(default=2, ge=1)
    greedy_length: int = Field(default=128, ge=1)


def sorted_magnitudes(batches: list[Tensor], budget: int = SAMPLE) -> Tensor:
    """An even subsample (≤ ``budget`` values) of ``|x|`` over the batches, sorted."""
    per_batch = max(1, budget // len(batches))
    parts = []
    for x in batches:
        flat = x.detach().reshape(-1).abs().float()
        parts.append(flat[:: max(1, -(-flat.numel() // per_batch))].cpu())
    return torch.cat(parts).sort().values


def level_threshold(magnitudes: Tensor, level: float) -> float:
    """The magnitude below which a fraction ``level`` of ``magnitudes`` (sorted) lies."""
    if level <= 0:
        return 0.0
    index = min(int(level * magnitudes.numel()), magnitudes.numel() - 1)
    return float(magnitudes[index])


@register
class Teal(Method):
    """TEAL: per-linear input thresholds, levels allocated greedily (or uniformly) per block."""

    name = "teal"
    needs_calibration: ClassVar[bool] = True
    Args: ClassVar[type[BaseModel]] = TealArgs

    def __init__(self, recipe, args) -> None:
        super().__init__(recipe, args)
        self.thresholds: dict[str, Tensor] = {}
        self.levels: dict[str, float] = {}  # "block.linear" -> the level it was given
        self.paths: dict[str, str] = {}  # Llama's name -> the family's path (Phi-3's parts)

    def check(self, model: nn.Module, adapter) -> None:
        super().check(model, adapter)
        where = f"recipe '{self.recipe.name}', step '{self.name}'"
        self.paths = gated_mlp_paths(model, adapter, where)

    def _linear(self, block: nn.Module, name: str) -> nn.Module:
        return block.get_submodule(self.paths[name])

    def apply(self, ctx: BlockContext) -> None:
        block = ctx.block
        inputs = sorted(set(LINEARS.values()))
        seen: dict[str, list[Tensor]] = {name: [] for name in inputs}
        budget = SAMPLE // max(1, len(ctx.inputs))

        def keep(name: str, x: Tensor) -> None:
            seen[name].append(sorted_magnitudes([x], budget))

        canonical = {self.paths[name]: name for name in inputs}
        ctx.observe(tuple(canonical), lambda path, x: keep(canonical[path], x))
        magnitudes = {name: torch.cat(parts).sort().values for name, parts in seen.items()}
        thresholds = {name: torch.zeros(()) for name in LINEARS}
        for name, threshold in thresholds.items():
            install_threshold_hook(self._linear(block, name), threshold, on_output=False)
            mark_sparse_input(self._linear(block, name))

        def set_level(name: str, level: float) -> None:
            thresholds[name].fill_(level_threshold(magnitudes[LINEARS[name]], level))

        if self.args.allocation == "uniform":
            levels = dict.fromkeys(LINEARS, self.args.sparsity)
        else:
            levels = self._greedy(ctx, block, set_level)
        for name, level in levels.items():
            set_level(name, level)
            self.levels[f"{ctx.index}.{name}"] = level
            self.thresholds[f"{ctx.index}.{name}"] = thresholds[name]

    def _greedy(self, ctx: BlockContext, block: nn.Module, set_level) -> dict[str, float]:
        """The paper's block-wise greedy allocation (see the module docstring)."""
        sizes = {n: linear_weight(self._linear(block, n), ctx.adapter.transposed_weights).numel()
                 for n in LINEARS}  # fmt: skip
        total = sum(sizes.values())
        unit = sizes["self_attn.q_proj"]
        batches = self._greedy_batches(ctx)

        def outputs() -> list[Tensor]:
            with torch.no_grad():
                return [hidden_state(block(x, **kw)) for x, kw in batches]

        dense = outputs()

        def error() -> float:
            return sum(float((y - d).pow(2).mean()) for y, d in zip(outputs(), dense, strict=True))

        def mean(levels: dict[str, float]) -> float:
            return sum(sizes[n] * s for n, s in levels.items()) / total

        levels = dict.fromkeys(LINEARS, 0.0)
        previous = dict(levels)
        while mean(levels) < self.args.sparsity - 1e-9:
            best: tuple[float, str, float] | None = None
            for name, level in levels.items():
                if level >= MAX_LEVEL:
                    continue
                trial = min(level + self.args.step * unit / sizes[name], MAX_LEVEL)
                set_level(name, trial)
                score = error()
                set_level(name, level)
                if best is None or score < best[0]:
                    best = (score, name, trial)
            if best is None:
                break
            previous = dict(levels)
            levels[best[1]] = best[2]
            set_level(best[1], best[2])
        if abs(mean(previous) - self.args.sparsity) < abs(mean(levels) - self.args.sparsity):
            levels = previous
        return levels

    def _greedy_batches(self, ctx: BlockContext) -> list[tuple[Tensor, dict]]:
        """The first ``greedy_length`` tokens of the first ``greedy_samples`` calibration
        sequences, as ``(hidden, kwargs)`` batches (see :func:`slice_batch`)."""
        left, batches = self.args.greedy_samples, []
        for x, kw in zip(ctx.inputs, ctx.kwargs, strict=True):
            if left <= 0:
                break
            take = min(left, x.shape[0])
            length = min(self.args.greedy_length, x.shape[1])
            hidden = x[:take, :length].to(ctx.device)
            batches.append((hidden, slice_batch(kw, x.shape[:2], (take, length))))
            left -= take
        return batches

    def saved_state(self) -> dict[str, Tensor]:
        return {key: value.reshape(-1).clone() for key, value in self.thresholds.items()}

    def restore(self, model: nn.Module, adapter, state: dict[str, Tensor]) -> None:
        self.paths = gated_mlp_paths(model, adapter, "step 'teal'")
        for index, block in enumerate(adapter.block_list(model)):
            for name in LINEARS:
                key = f"{index}.{name}"
                if key not in state:
                    raise ChannelwiseError(
                        f"teal: the checkpoint lacks the threshold of block {index} {name}; it "
                        "does not match its recipe"
                    )
                threshold = state[key].reshape(()).float()
                self.thresholds[key] = threshold
                install_threshold_hook(self._linear(block, name), threshold, on_output=False)
                mark_sparse_input(self._linear(block, name))


def slice_batch(value, shape: tuple[int, int], keep: tuple[int, int]):
    """A block's keyword arguments for the first ``keep = (rows, tokens)`` of a batch of
    ``shape = (batch, seq)``: every tensor cut to ``rows`` along a leading batch dimension and
    to ``tokens`` along every dimension of the sequence's length (positions, rotary tables, a
    ``(…, seq, seq)`` mask). Exact for a causal block: its first tokens do not see the rest."""
    (batch, seq), (rows, tokens) = shape, keep
    if isinstance(value, Tensor):
        if value.dim() and value.shape[0] == batch and batch > 1 and rows < batch:
            value = value[:rows]
        if tokens < seq:
            for dim, size in enumerate(value.shape):
                if size == seq and not (dim == 0 and value.dim() > 1 and batch == seq):
                    value = value.narrow(dim, 0, tokens)
        return value
    if isinstance(value, dict):
        return {k: slice_batch(v, shape, keep) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(slice_batch(v, shape, keep) for v in value)
    return value
