"""SmoothQuant: migrate activation outliers into the weights before W8A8 quantization.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models", ICML 2023, arXiv 2211.10438. Activations of LLMs have a few input channels with values
orders of magnitude above the rest; per-token activation quantization then wastes its grid on
them. Dividing channel ``j`` by ``s_j = max|X_j|^α / max|W_{:,j}|^{1−α}`` and multiplying the
weight column by ``s_j`` leaves every product unchanged in float, flattens the activations, and
moves part of the range into the weights, which quantize per output channel and absorb it well.
``α`` says how much difficulty moves to the weights (0: none beyond normalizing W, 1: all).

This step only rewrites weights (exactly, see :mod:`channelwise.transforms.smooth`); it quantizes
nothing. Put it before the quantizing step::

    steps: [{method: smoothquant, args: {alpha: 0.85}}, {method: rtn}]

Arguments:

``alpha`` (``[0, 1]``; default: per model type)
    When omitted, the value the official repository uses for that family: OPT 0.5;
    Llama (Llama-2-7B/13B, Llama-3) 0.85, so SmolLM2 and every ``model_type: llama`` get 0.85
    (Llama-2-70B uses 0.9, a size this table cannot see); Mistral 0.8. Qwen2 has no official value
    and is treated as Llama-like (0.85); GPT-2 and GPT-NeoX have none either and get the paper's
    default 0.5. ``DEFAULT_ALPHA`` holds the table.
``subsets`` (default: every subset whose input comes from a norm)
    Adapter subset names to smooth. The paper smooths the inputs of QKV and of fc1 (Llama:
    gate/up), i.e. the ``norm`` subsets (``attn_in``, ``mlp_in``). Listing them explicitly may
    add ``linear`` subsets (v_proj → o_proj without GQA, up_proj → down_proj) and the
    ``grouped_heads`` subset (v_proj → o_proj under GQA: the factor is derived per v channel from
    the max over each KV head's group of query heads, then repeated across the group).

Per block: one forward pass over all calibration tokens streams each smoothed subset's input
through a running per-channel abs-max (:class:`~channelwise.observe.ChannelStats`); ``s`` comes
from that and the consumers' column abs-max (max over rows, then over all linears of the subset,
both clamped at 1e-5); the fold goes into the norm (γ, β /= s) or the producing linear.

Deviations from the paper and the official code (``mit-han-lab/smoothquant``):

- Statistics are computed block by block from the inputs the engine feeds each block: the outputs
  of the previous blocks *after* they were smoothed, weight-quantized and given their activation
  quantizers, so each block's scales see the error that precedes it at inference. The official
  code collects all statistics on the float model in one pass before changing anything.
- Calibration is the project protocol's (128 × 512 tokens of *Emma*), not 512 × 512 Pile-val.
- A channel with zero activation or zero weight abs-max gets ``s = 1`` (the official code only
  clamps, which would give it an extreme factor).
- Quantization is simulated (fake-quant); attention-matmul (BMM) inputs are quantized only if the
  recipe's ``attention`` section asks for it.
- Folding into norms is refused on post-LN models (OPT-350m), where it would not be exact.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from channelwise.adapters import ModelAdapter, Subset
from channelwise.engine import BlockContext
from channelwise.errors import RecipeError
from channelwise.methods import registry
from channelwise.methods.registry import Method, register
from channelwise.observe import ChannelStats
from channelwise.transforms.smooth import (
    fold_scales_between_linears,
    fold_scales_grouped_heads,
    fold_scales_into_norm,
    reduce_to_kv_heads,
    smooth_scales,
    weight_input_absmax,
)

#: α used when a step gives none, by Hugging Face ``model_type`` (see the module docstring).
DEFAULT_ALPHA: dict[str, float] = {
    "opt": 0.5,
    "llama": 0.85,
    "mistral": 0.8,
    "qwen2": 0.85,
    "gpt2": 0.5,
    "gpt_neox": 0.5,
}
#: α for a model type missing from ``DEFAULT_ALPHA``: the paper's default.
FALLBACK_ALPHA = 0.5

FOLDABLE_KINDS = ("norm", "linear", "grouped_heads")


def default_alpha(model_type: str | None) -> float:
    """The documented default α for a model type (``FALLBACK_ALPHA`` when unknown)."""
    return DEFAULT_ALPHA.get(model_type or "", FALLBACK_ALPHA)


class SmoothQuantArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float | None = Field(default=None, ge=0.0, le=1.0)
    subsets: list[str] | None = Field(default=None, min_length=1)


@register
class SmoothQuant(Method):
    """Per-channel smoothing folded into norms (and optionally linears); quantizes nothing."""

    name = "smoothquant"
    needs_calibration = True
    distributed = True
    offloadable = True
    quantizes_weights = False
    Args: ClassVar[type[BaseModel]] = SmoothQuantArgs

    def __init__(self, recipe, args) -> None:
        super().__init__(recipe, args)
        self.alpha: float | None = None
        self.subsets: tuple[Subset, ...] | None = None
        self.n_rep = 1
        self.head_dim = 0
        #: ``scales[(block_index, subset_name)]``: the factors folded, on the CPU (diagnostics).
        self.scales: dict[tuple[int, str], torch.Tensor] = {}

    # --- planning ----------------------------------------------------------------------------

    def check(self, model, adapter: ModelAdapter) -> None:
        where = f"recipe '{self.recipe.name}', step 'smoothquant'"
        registry.check_transform_order(self.recipe, self.name, "smoothing")
        config = getattr(model, "config", None)
        self.alpha = (
            self.args.alpha
            if self.args.alpha is not None
            else default_alpha(getattr(config, "model_type", None))
        )
        self.subsets = self._select_subsets(adapter, where)
        if any(subset.prev_kind == "norm" for subset in self.subsets):
            adapter.require_folding("smoothquant")
        if any(subset.prev_kind == "grouped_heads" for subset in self.subsets):
            heads = config.num_attention_heads
            kv_heads = getattr(config, "num_key_value_heads", None) or heads
            self.n_rep = heads // kv_heads
            self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    def _select_subsets(self, adapter: ModelAdapter, where: str) -> tuple[Subset, ...]:
        by_name = {subset.name: subset for subset in adapter.subsets}
        foldable = [s.name for s in adapter.subsets if s.prev_kind in FOLDABLE_KINDS]
        if self.args.subsets is None:
            chosen = tuple(s for s in adapter.subsets if s.prev_kind == "norm")
            if not chosen:
                raise RecipeError(f"{where}: {adapter.family} declares no norm → linear subset")
            return chosen
        names = list(self.args.subsets)
        for name in names:
            if name not in by_name:
                raise RecipeError(
                    f"{where}: unknown subset '{name}' for {adapter.family}; "
                    f"smoothable subsets: {', '.join(foldable)}"
                )
            subset = by_name[name]
            if subset.prev_kind not in FOLDABLE_KINDS or subset.prev is None:
                raise RecipeError(
                    f"{where}: subset '{name}' of {adapter.family} has no op to fold scales into "
                    f"(its input is not produced by a norm or a single linear); smoothable "
                    f"subsets: {', '.join(foldable)}"
                )
            if subset.prev_kind == "grouped_heads" and len(subset.linears) != 1:
                raise RecipeError(f"{where}: grouped-heads subset '{name}' must have one linear")
        if len(set(names)) != len(names):
            raise RecipeError(f"{where}: subsets are listed more than once: {names}")
        # Adapter order: the folds of one block commute, but a fixed order keeps runs identical.
        return tuple(s for s in adapter.subsets if s.name in names)

    # --- work on one block -------------------------------------------------------------------

    def apply(self, ctx: BlockContext) -> None:
        if self.subsets is None or self.alpha is None:
            raise RecipeError(
                "smoothquant: the method was not checked against the model; "
                "run it through channelwise.quantize (or compress.plan) first"
            )
        block, transposed = ctx.block, ctx.adapter.transposed_weights
        # Each fold changes only its own subset's input, so one pass serves every subset.
        observed = {subset.linears[0]: subset.name for subset in self.subsets}
        stats = {subset.name: ChannelStats() for subset in self.subsets}
        with torch.no_grad():
            ctx.observe(tuple(observed), lambda linear, x: stats[observed[linear]].update(x))
            for subset in self.subsets:
                stats[subset.name].all_reduce(ctx.group)
                act_absmax = stats[subset.name].absmax
                if act_absmax is None:
                    raise RecipeError(
                        f"smoothquant: block {ctx.index} never ran '{subset.linears[0]}' on the "
                        "calibration data; cannot collect its statistics"
                    )
                linears = [block.get_submodule(name) for name in subset.linears]
                prev = block.get_submodule(subset.prev)
                weight_absmax = weight_input_absmax(linears, transposed)
                if subset.prev_kind == "grouped_heads":
                    act_absmax = reduce_to_kv_heads(act_absmax, self.n_rep, self.head_dim)
                    weight_absmax = reduce_to_kv_heads(weight_absmax, self.n_rep, self.head_dim)
                s = smooth_scales(act_absmax, weight_absmax, self.alpha)
                if subset.prev_kind == "norm":
                    fold_scales_into_norm(prev, linears, s, transposed)
                elif subset.prev_kind == "linear":
                    fold_scales_between_linears(prev, linears, s, transposed)
                else:
                    fold_scales_grouped_heads(
                        prev, linears[0], s, self.n_rep, transposed, head_dim=self.head_dim
                    )
                self.scales[(ctx.index, subset.name)] = s.cpu()
