"""Activation sparsity calibrated on data: CHESS, with CATS as its baseline.

He et al., "CHESS: Optimizing LLM Inference via Channel-Wise Thresholding and Selective
Sparsification", EMNLP 2024, arXiv 2409.01366. Lee et al., "CATS: Contextually-Aware
Thresholding for Sparsity in Large Language Models", arXiv 2404.08763.

In a gated MLP ``down(act(gate(x)) · up(x))``, a channel whose activation ``act(gate(x))_i`` is
zeroed contributes nothing: the matching rows of ``up`` and column of ``down`` can be skipped.
Both methods zero the activations whose magnitude falls below a threshold calibrated so that a
fraction ``sparsity`` of them is zeroed:

* **CATS** — one threshold per layer: the ``sparsity``-quantile of ``|act(gate(x))|``.
* **CHESS** — one threshold per channel: the importance of channel ``i`` is
  ``|act(gate(x))_i| · E|up(x)_i|`` (the mean from calibration), the layer threshold ``τ`` is the
  ``sparsity``-quantile of the importances, and channel ``i`` is zeroed where
  ``|act(gate(x))_i| < θ_i = τ / E|up(x)_i|``: a channel whose ``up`` output is small is cut more
  often. With ``attention`` (the paper's "CHESS w/"), the inputs of ``q_proj`` and ``o_proj``
  are also sparsified with one magnitude threshold per tensor (their ``sparsity``-quantile);
  ``k_proj`` and ``v_proj`` read the dense input, since their errors would persist in the KV
  cache.

The zeroing is a forward hook on the MLP's activation module and forward pre-hooks on ``q_proj``
and ``o_proj`` (the weights are unchanged: a following quantizing step sees them as they were);
the thresholds are the step's saved state, re-installed on load. Gated-MLP families only (Llama,
Qwen2, Mistral): the others are refused.

Deviations and ambiguities:

- Quantiles are taken per calibration sequence and averaged over the sequences, as the official
  code does for CHESS (``thresholds.py``); CATS' layer threshold is estimated the same way here
  (its paper takes the quantile of a calibration histogram).
- Each sequence's quantile is taken on an even subsample of at most 65,536 of its entries
  (:data:`QUANTILE_SAMPLE`), for speed.
- Calibration data is the protocol's (Emma, 128 × 512 tokens) instead of the paper's ~65k tokens
  of C4; the thresholds are computed block by block on the block inputs of the already processed
  (possibly transformed) model, like every other step here.
- The block's MLP becomes a :class:`~channelwise.deploy.sparse.SparseGatedMLP` (same children
  and keys): on decode it multiplies only the active ``up`` rows and ``down`` columns, the role
  of the paper's ``spvmm``/``vmmsp`` CPU kernels (ours: :mod:`channelwise.kernels.sparse`, fp32,
  W8 and W4); ``q_proj`` and ``o_proj`` take the sparse-input kernel (their inputs' zeroed
  columns skipped).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from channelwise.deploy.sparse import (
    SPARSITY_HOOK_ATTR,  # noqa: F401  (re-exported)
    install_threshold_hook,
    mark_sparse_input,
    remove_threshold_hook,  # noqa: F401  (re-exported)
    use_sparse_mlp,
)
from channelwise.engine import BlockContext
from channelwise.errors import ChannelwiseError, RecipeError
from channelwise.methods.registry import Method, register

GATE, UP, ACT = "mlp.gate_proj", "mlp.up_proj", "mlp.act_fn"
ATTENTION_INPUTS = ("self_attn.q_proj", "self_attn.o_proj")
#: Quantiles of a longer row are taken on an even subsample of this many entries (the rank error,
#: ~1/√n = 0.4%, is far below the spread between sequences; a full sort of a 512-token SmolLM2
#: sequence's 786k activations took 20 s per block for 128 sequences).
QUANTILE_SAMPLE = 1 << 16


class SparsityArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sparsity: float = Field(default=0.5, gt=0.0, lt=1.0)


class ChessArgs(SparsityArgs):
    attention: bool = True


def require_gated_mlp(model: nn.Module, adapter, name: str) -> None:
    """Refuse a family without a gated MLP (``gate_proj``/``up_proj``/``act_fn`` per block)."""
    if adapter.mlp_act is not None and adapter.mlp_act != ACT:
        raise RecipeError(
            f"{name}: thresholds act on a gated MLP's activation at Llama's gate_proj, up_proj "
            f"and act_fn; {adapter.family} computes gate and up in one fused projection "
            f"(activation at {adapter.mlp_act}), which the sparse MLP does not take"
        )
    block = adapter.block_list(model)[0]
    for part in (GATE, UP, ACT):
        try:
            block.get_submodule(part)
        except AttributeError:
            raise RecipeError(
                f"{name}: thresholds act on a gated MLP's activation (gate_proj, up_proj, "
                f"act_fn); a {adapter.family} block has no {part}"
            ) from None
    acts = [id(b.get_submodule(ACT)) for b in adapter.block_list(model)]
    if len(set(acts)) != len(acts):
        raise RecipeError(f"{name}: the blocks share one activation module; cannot hook each")


def sequence_quantile(values: Tensor, q: float) -> Tensor:
    """The ``q``-quantile of each row of ``values`` ``(rows, …)``, averaged over the rows (a row
    is one calibration sequence, flattened); a row longer than :data:`QUANTILE_SAMPLE` is
    subsampled evenly first."""
    rows = values.reshape(values.shape[0], -1)
    if rows.shape[1] > QUANTILE_SAMPLE:
        step = -(-rows.shape[1] // QUANTILE_SAMPLE)
        rows = rows[:, ::step]
    return torch.quantile(rows.float(), q, dim=1).mean()


class _ThresholdMethod(Method):
    """What CATS and CHESS share: calibration of the MLP activation (and optionally the
    attention inputs), hooks, saved thresholds."""

    needs_calibration: ClassVar[bool] = True
    Args: ClassVar[type[BaseModel]] = SparsityArgs
    reads_up: ClassVar[bool] = False  # whether the threshold needs the up_proj outputs

    def __init__(self, recipe, args) -> None:
        super().__init__(recipe, args)
        self.thresholds: dict[str, Tensor] = {}

    @property
    def attention(self) -> bool:
        """Whether the q_proj and o_proj inputs are sparsified too (CHESS's option)."""
        return getattr(self.args, "attention", False)

    def check(self, model: nn.Module, adapter) -> None:
        super().check(model, adapter)
        require_gated_mlp(model, adapter, f"recipe '{self.recipe.name}', step '{self.name}'")

    def mlp_threshold(self, act: Tensor, up: Tensor | None) -> Tensor:
        """The activation threshold (scalar or per channel) from ``act``/``up`` outputs
        ``(sequences, tokens, channels)`` (``up`` only where :attr:`reads_up`)."""
        raise NotImplementedError

    def apply(self, ctx: BlockContext) -> None:
        """Every threshold of the block from its dense forward, then the hooks."""
        block = ctx.block
        found: list[tuple[str, Tensor, bool]] = []
        if self.attention:
            for name in ATTENTION_INPUTS:
                x = torch.cat(ctx.capture(name)).abs()
                found.append((name, sequence_quantile(x, self.args.sparsity), False))
                del x
        gate, up, act = (block.get_submodule(n) for n in (GATE, UP, ACT))
        with torch.no_grad():
            mlp_inputs = ctx.capture(GATE)
            acts = torch.cat([act(gate(x)) for x in mlp_inputs])
            ups = torch.cat([up(x) for x in mlp_inputs]) if self.reads_up else None
        found.append((ACT, self.mlp_threshold(acts, ups), True))
        for name, threshold, on_output in found:
            self._install(ctx.index, block, name, threshold, on_output)

    def _install(self, index: int, block, name: str, threshold: Tensor, on_output: bool) -> None:
        threshold = threshold.detach().float().cpu()
        self.thresholds[f"{index}.{name}"] = threshold
        install_threshold_hook(block.get_submodule(name), threshold, on_output)
        if name == ACT:
            use_sparse_mlp(block)
        else:
            mark_sparse_input(block.get_submodule(name))

    def saved_state(self) -> dict[str, Tensor]:
        return {key: value.reshape(-1) for key, value in self.thresholds.items()}

    def restore(self, model: nn.Module, adapter, state: dict[str, Tensor]) -> None:
        blocks = adapter.block_list(model)
        names = (ACT, *ATTENTION_INPUTS) if self.attention else (ACT,)
        for index, block in enumerate(blocks):
            for name in names:
                key = f"{index}.{name}"
                if key not in state:
                    raise ChannelwiseError(
                        f"{self.name}: the checkpoint lacks the threshold of block {index} "
                        f"{name}; it does not match its recipe"
                    )
                value = state[key]
                threshold = value if value.numel() > 1 else value.reshape(())
                self._install(index, block, name, threshold, on_output=name == ACT)


@register
class Cats(_ThresholdMethod):
    """CATS: one magnitude threshold per layer on the MLP activation."""

    name = "cats"

    def mlp_threshold(self, act: Tensor, up: Tensor | None) -> Tensor:
        return sequence_quantile(act.abs(), self.args.sparsity)


@register
class Chess(_ThresholdMethod):
    """CHESS: per-channel thresholds from ``|act|·E|up|``; optionally the attention inputs."""

    name = "chess"
    Args: ClassVar[type[BaseModel]] = ChessArgs
    reads_up: ClassVar[bool] = True

    def mlp_threshold(self, act: Tensor, up: Tensor | None) -> Tensor:
        mean_up = up.abs().float().mean(dim=(0, 1)).clamp_min(torch.finfo(torch.float32).tiny)
        tau = sequence_quantile(act.abs().float() * mean_up, self.args.sparsity)
        return tau / mean_up
