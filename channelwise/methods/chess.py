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
Qwen2, Mistral, Qwen3, Gemma 2/3, Phi-3): the others are refused. Phi-3's fused ``gate_up_proj``
is quantized and thresholded as its two parts; its MLP keeps transformers' dense forward (the
zeroed channels give the same output), and only ``down_proj`` takes the sparse-input kernel.

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
#: The block linears of Llama's layout, the names thresholds are saved under in every family.
BLOCK_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    GATE,
    UP,
    "mlp.down_proj",
)
#: Quantiles of a longer row are taken on an even subsample of this many entries (the rank error,
#: ~1/√n = 0.4%, is far below the spread between sequences; a full sort of a 512-token SmolLM2
#: sequence's 786k activations took 20 s per block for 128 sequences).
QUANTILE_SAMPLE = 1 << 16


class SparsityArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sparsity: float = Field(default=0.5, gt=0.0, lt=1.0)


class ChessArgs(SparsityArgs):
    attention: bool = True


def gated_mlp_paths(model: nn.Module, adapter, name: str) -> dict[str, str]:
    """Llama's block paths (:data:`BLOCK_LINEARS` and ``mlp.act_fn``) → ``adapter``'s family's
    (Phi-3: the parts of its split fused projections, ``mlp.activation_fn``); refuses a family
    without a gated MLP."""
    linears = adapter.linear_names()
    paths = {}
    for canonical in BLOCK_LINEARS:
        group, leaf = canonical.split(".")[0], canonical.rsplit(".", 1)[1]
        found = [n for n in linears if n.split(".")[0] == group and n.rsplit(".", 1)[1] == leaf]
        paths[canonical] = found[0] if len(found) == 1 else canonical
    paths[ACT] = adapter.mlp_act or ACT
    blocks = adapter.block_list(model)
    mlp_first = sorted(paths, key=lambda canonical: not canonical.startswith("mlp."))
    for path in (paths[canonical] for canonical in mlp_first):
        try:
            blocks[0].get_submodule(path)
        except AttributeError:
            raise RecipeError(
                f"{name}: thresholds act on a gated MLP (gate_proj, up_proj, its activation, "
                f"down_proj) and the attention linears; {adapter.family} blocks have no {path}"
            ) from None
    acts = [id(b.get_submodule(paths[ACT])) for b in blocks]
    if len(set(acts)) != len(acts):
        raise RecipeError(f"{name}: the blocks share one activation module; cannot hook each")
    return paths


def llama_layout(paths: dict[str, str]) -> bool:
    """Whether the block is laid out as Llama's (its MLP can become a ``SparseGatedMLP``)."""
    return all(path == canonical for canonical, path in paths.items())


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
        self.paths: dict[str, str] = {}

    @property
    def attention(self) -> bool:
        """Whether the q_proj and o_proj inputs are sparsified too (CHESS's option)."""
        return getattr(self.args, "attention", False)

    def check(self, model: nn.Module, adapter) -> None:
        super().check(model, adapter)
        where = f"recipe '{self.recipe.name}', step '{self.name}'"
        self.paths = gated_mlp_paths(model, adapter, where)

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
                x = torch.cat(ctx.capture(self.paths[name])).abs()
                found.append((name, sequence_quantile(x, self.args.sparsity), False))
                del x
        gate, up, act = (block.get_submodule(self.paths[n]) for n in (GATE, UP, ACT))
        with torch.no_grad():
            mlp_inputs = ctx.capture(self.paths[GATE])
            acts = torch.cat([act(gate(x)) for x in mlp_inputs])
            ups = torch.cat([up(x) for x in mlp_inputs]) if self.reads_up else None
        found.append((ACT, self.mlp_threshold(acts, ups), True))
        for name, threshold, on_output in found:
            self._install(ctx.index, block, name, threshold, on_output)

    def _install(self, index: int, block, name: str, threshold: Tensor, on_output: bool) -> None:
        threshold = threshold.detach().float().cpu()
        self.thresholds[f"{index}.{name}"] = threshold
        install_threshold_hook(block.get_submodule(self.paths[name]), threshold, on_output)
        if name != ACT:
            mark_sparse_input(block.get_submodule(self.paths[name]))
        elif llama_layout(self.paths):
            use_sparse_mlp(block)
        else:  # a fused gate/up runs dense; down_proj still skips the zeroed channels
            mark_sparse_input(block.get_submodule(self.paths["mlp.down_proj"]))

    def saved_state(self) -> dict[str, Tensor]:
        return {key: value.reshape(-1) for key, value in self.thresholds.items()}

    def restore(self, model: nn.Module, adapter, state: dict[str, Tensor]) -> None:
        self.paths = gated_mlp_paths(model, adapter, f"step '{self.name}'")
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
