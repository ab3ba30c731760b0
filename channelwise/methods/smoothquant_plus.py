"""SmoothQuant+: SmoothQuant's smoothing with one α searched for the whole model, for W4A16.

Pan, Wang, Zheng, Li, Wang, Feng, "SmoothQuant+: Accurate and Efficient 4-bit Post-Training
Weight Quantization for LLM", arXiv 2312.03788. Weight quantization error is amplified by the
activation outliers that multiply it; dividing input channel ``j`` by ``s_j = max|X_j|^α /
max|W_{:,j}|^{1−α}`` (SmoothQuant's factor, :func:`~channelwise.transforms.smooth.smooth_scales`)
and multiplying the weight columns by ``s_j`` is exact in float and shrinks that amplification;
then the weights are quantized group-wise. Unlike AWQ (one search per layer), a single ``α`` is
used everywhere and chosen by the loss of the *whole quantized model*.

``prepare_model`` (once, before the block loop): on the first ``samples`` calibration sequences,
one float forward pass records the per-channel abs-max of every smoothable subset's input; then
for each ``α`` of the grid, every block is smoothed with those statistics and its linears rounded
with the recipe's ``weights`` quantizer (RTN), the mean next-token cross-entropy on the same
sequences is measured, and the float weights are restored. The ``α`` with the lowest loss is kept
(``self.alpha``, ``self.losses``; logged at INFO). ``apply`` then smooths each block with that
``α`` and the *same* float-pass statistics, so with a following ``rtn`` the model quantized is
exactly the one scored. Smoothed subsets: every linear with an absorbable producer —
QKV ← input norm, gate/up ← post-attention norm, down ← up rows, o ← v rows (under grouped-query
attention one factor per v channel, from the max over its query heads).

This step quantizes nothing; a quantizing step must follow it (``rtn`` as in the paper, or
``gptq``; the α search always scores RTN)::

    steps: [{method: smoothquant_plus}, {method: rtn}]

Arguments: ``alphas`` (the grid, default 0, 0.05, …, 1), ``samples`` (16 sequences),
``batch_size`` (sequences per forward in the search, 4).

Deviations and choices (no algorithm code was released; the search objective is from memory of
the paper [recall], the paper's text was not available here):

- The objective is the mean next-token cross-entropy of the quantized model on calibration
  sequences: the model's own loss, with no float reference to store, and the quantity perplexity
  measures. A final-output MSE against the float model would need its logits kept per α.
- Only the first ``samples`` calibration sequences are used, for both the statistics and the
  loss (16 × 512 tokens by default; the paper calibrates on more), to keep ``len(alphas)``
  whole-model forwards affordable on a CPU.
- Statistics come from the float model, not from the engine's block inputs (which carry the
  earlier blocks' quantization error, as :mod:`~channelwise.methods.smoothquant` uses).
- The paper quantizes with groups of 128; the presets use 64 on SmolLM2 (see README).
- Calibration is the project protocol's (*Emma*). Folding into norms is refused on post-LN models
  (OPT-350m). The step must be the recipe's first: its statistics describe the model as
  ``prepare_model`` sees it.
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn
from tqdm.auto import tqdm

from channelwise.adapters import ModelAdapter, Subset
from channelwise.engine import BlockContext, model_device
from channelwise.errors import RecipeError
from channelwise.methods.registry import Method, check_search_transform, register
from channelwise.methods.rtn import rtn_block
from channelwise.transforms.smooth import smooth_scales, weight_input_absmax
from channelwise.transforms.subset_scales import (
    fold_subset,
    foldable_subsets,
    head_geometry,
    to_fold_channels,
)

log = logging.getLogger(__name__)

DEFAULT_ALPHAS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))


class SmoothQuantPlusArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    alphas: tuple[float, ...] = Field(default=DEFAULT_ALPHAS, min_length=1)
    samples: int = Field(default=16, ge=1)
    batch_size: int = Field(default=4, ge=1)

    @field_validator("alphas")
    @classmethod
    def _in_unit_interval(cls, alphas: tuple[float, ...]) -> tuple[float, ...]:
        bad = [a for a in alphas if not 0.0 <= a <= 1.0]
        if bad:
            raise ValueError(f"every alpha must be in [0, 1], got {bad}")
        return alphas


#: ``stats[block_index][subset_name]``: abs-max of the subset's input, ``(C,)``, on the CPU.
Stats = list[dict[str, Tensor]]


def collect_absmax(model: nn.Module, adapter: ModelAdapter, ids: Tensor, batch_size: int) -> Stats:
    """One float forward over ``ids`` ``(n, seq)``: per block and subset, ``max|x|`` per channel."""
    blocks = adapter.block_list(model)
    subsets = foldable_subsets(adapter)
    stats: Stats = [{} for _ in blocks]
    handles = []
    for index, block in enumerate(blocks):
        for subset in subsets:

            def hook(_module, args, index=index, name=subset.name) -> None:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float().cpu()
                old = stats[index].get(name)
                stats[index][name] = x if old is None else torch.maximum(old, x)

            module = block.get_submodule(subset.linears[0])
            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], batch_size):
                model(ids[start : start + batch_size], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def smooth_block(
    block: nn.Module,
    subsets: tuple[Subset, ...],
    stats: dict[str, Tensor],
    alpha: float,
    transposed: bool,
    n_rep: int,
    head_dim: int,
) -> None:
    """Fold SmoothQuant's ``s`` (from ``stats`` and the current weights) into every subset."""
    for subset in subsets:
        linears = [block.get_submodule(name) for name in subset.linears]
        act = to_fold_channels(subset, stats[subset.name], n_rep, head_dim)
        weight = to_fold_channels(subset, weight_input_absmax(linears, transposed), n_rep, head_dim)
        s = smooth_scales(act, weight.to(act.device), alpha)
        fold_subset(block, subset, s, transposed, n_rep, head_dim)


def mean_cross_entropy(model: nn.Module, ids: Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` on ``ids`` ``(n, seq)``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size]
            logits = model(batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:].to(logits.device)
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            ).item()
            count += targets.numel()
    return total / count


@register
class SmoothQuantPlus(Method):
    """One model-wide α for SmoothQuant smoothing, searched on the RTN-quantized model's loss."""

    name = "smoothquant_plus"
    needs_calibration = True
    quantizes_weights = False
    Args: ClassVar[type[BaseModel]] = SmoothQuantPlusArgs

    def __init__(self, recipe, args) -> None:
        super().__init__(recipe, args)
        self.subsets: tuple[Subset, ...] = ()
        self.n_rep, self.head_dim = 1, 1
        #: The α chosen by ``prepare_model`` and the loss of every α tried.
        self.alpha: float | None = None
        self.losses: dict[float, float] = {}
        self.stats: Stats = []

    def check(self, model, adapter: ModelAdapter) -> None:
        super().check(model, adapter)
        where = f"recipe '{self.recipe.name}', step '{self.name}'"
        check_search_transform(self.recipe, self.name)
        if self.recipe.steps[0].method != self.name:
            raise RecipeError(
                f"{where}: it must be the first step (its α search and statistics describe the "
                f"model before any step changes it); move it before '{self.recipe.steps[0].method}'"
            )
        self.subsets = foldable_subsets(adapter)
        if not self.subsets:
            raise RecipeError(f"{where}: {adapter.family} declares no subset to smooth")
        if any(subset.prev_kind == "norm" for subset in self.subsets):
            adapter.require_folding(self.name)
        if any(subset.prev_kind == "grouped_heads" for subset in self.subsets):
            self.n_rep, self.head_dim = head_geometry(model.config)

    def prepare_model(
        self, model: nn.Module, adapter: ModelAdapter, calibration, *, progress: bool = False
    ) -> None:
        if calibration is None:
            raise RecipeError(f"{self.name}: the α search needs calibration token ids")
        ids = calibration[: self.args.samples].to(model_device(model))
        if ids.shape[1] < 2:
            raise RecipeError(f"{self.name}: calibration sequences need at least 2 tokens")
        batch = self.args.batch_size
        self.stats = collect_absmax(model, adapter, ids, batch)
        blocks = adapter.block_list(model)
        spec = self.recipe.weights.spec("weight")
        float_state = {k: v.clone() for k, v in blocks.state_dict().items()}
        self.losses = {}
        try:
            for alpha in tqdm(self.args.alphas, desc=f"{self.name} α", disable=not progress):
                for index, block in enumerate(blocks):
                    self._smooth(block, index, alpha, adapter.transposed_weights)
                    rtn_block(block, adapter, spec)
                loss = mean_cross_entropy(model, ids, batch)
                if not math.isfinite(loss):
                    loss = math.inf
                self.losses[alpha] = loss
                blocks.load_state_dict(float_state)
        finally:
            blocks.load_state_dict(float_state)
        self.alpha = min(self.losses, key=self.losses.get)  # ties: the first in the grid
        log.info(
            "smoothquant_plus: alpha %.2f (cross-entropy %.4f; grid %s … %s, %d samples)",
            self.alpha, self.losses[self.alpha], self.args.alphas[0], self.args.alphas[-1],
            ids.shape[0],
        )  # fmt: skip

    def apply(self, ctx: BlockContext) -> None:
        if self.alpha is None:
            raise RecipeError(
                f"{self.name}: no α was searched; run the recipe through channelwise.quantize, "
                "which calls prepare_model before the blocks"
            )
        self._smooth(ctx.block, ctx.index, self.alpha, ctx.adapter.transposed_weights)

    def _smooth(self, block: nn.Module, index: int, alpha: float, transposed: bool) -> None:
        smooth_block(
            block, self.subsets, self.stats[index], alpha, transposed, self.n_rep, self.head_dim
        )
