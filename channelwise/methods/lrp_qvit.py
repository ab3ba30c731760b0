"""LRP-QViT: mixed precision allocated by layer-wise relevance, clipped channel-wise ranges.

Ranjan, Savakis, "LRP-QViT: Mixed-Precision Vision Transformer Quantization via Layer-wise
Relevance Propagation", arXiv 2401.11243 (no official code).

Relevance is propagated from the backbone's output down through every block; the relevance
arriving at a layer's input, summed in absolute value over the calibration images, is the
layer's contribution score. Layers that contribute more get more bits, within an average-bit
budget. Post-LayerNorm activations are quantized per channel on clipped ranges and
reparameterized to per tensor as in RepQ-ViT (:func:`~channelwise.methods.repq_vit.
reparameterize_norm_input`), whose log√2 softmax quantizer this step installs too.

A *layer* is one adapter subset of a block: q/k/v together (the fused ``qkv`` of timm's ViT),
the attention output, fc1 and fc2; and, where every step of the recipe handles transitions,
a Swin patch merging's ``reduction`` (its LayerNorm reparameterized into it as in the blocks,
the bias this creates kept as step state). A layer's weights and its input get the same bits.

Arguments: ``budget`` (average weight bits over the layers' linears, weighted by parameter
count; default the recipe's ``weights.bits``), ``candidates`` (the bit-widths a layer may take;
default budget − 1 … budget + 2 within 2..8), ``activations`` (``mixed``: each layer's input at
its layer's bits; ``fixed``: every input at the recipe's activation bits), ``clip`` (the
percentile of each post-LayerNorm channel's range, default 99.9; ``null``: the recipe's range
method per channel, as RepQ-ViT), ``batch_size``, ``softmax_bits``.

What the paper's text available to us does not say, and what this module chose instead
(the abstract and second-hand summaries are all that could be read; each choice is ours):

- **Relevance rule.** Conservative propagation (Ali et al., "XAI for Transformers: Better
  Explanations through Conservative Propagation", arXiv 2202.07304): gradient × input with
  the LayerNorms' standard deviations and the attention probabilities held constant, which makes
  attention and normalisation linear in their input, so relevance is conserved through them
  (biases and GELU keep some; tested on a tiny ViT without either: every block input's relevance
  equals the output's). The paper follows
  Chefer et al.'s rules; the two agree on linear layers and differ at GELU and in how
  attention's two operands share relevance.
- **Where relevance starts.** The paper starts from the target class's logit. A headless
  backbone has none, so relevance starts from the energy of the last block's output,
  ``R = f²`` (LPViT's label-free loss, :mod:`channelwise.methods.lpvit`).
- **Score.** ``S_l = Σ |R|`` over the layer's input (tokens, channels, images), normalised to
  sum to 1 over all layers.
- **Allocation.** Bits minimise the relevance-weighted quantization noise ``Σ S_l·4^(−b_l)``
  (noise power falls 4× per bit) under ``Σ n_l·b_l ≤ budget·Σ n_l`` (``n_l``: the layer's
  weights), by greedy one-step upgrades in order of noise removed per added weight bit (optimal
  when every layer has the same size; a knapsack heuristic otherwise). Attention's q/k/v and
  softmax quantizers keep the recipe's bits.
- **Clipping.** Each post-LayerNorm channel's range is its ``[100 − clip, clip]`` percentile
  range before the reparameterization.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from channelwise.adapters import ModelAdapter, linear_weight
from channelwise.calibrate import set_input_bits
from channelwise.engine import BlockContext, hidden_state
from channelwise.errors import NonFiniteError, RecipeError
from channelwise.methods.ias_vit import check_reconstruction_step
from channelwise.methods.registry import Method, quantizes_transitions, register
from channelwise.methods.repq_vit import install_softmax_quantizers, reparameterize_norm_input
from channelwise.quant.attention import LogSqrt2Quantizer, probabilities_detached
from channelwise.quant.core import calibration_rows, static_qparams
from channelwise.quant.granularity import PerColumn
from channelwise.quant.grid import round_weight_, stored_bits, weight_grid
from channelwise.transforms.shift import ShiftState, restore_shift_state

log = logging.getLogger(__name__)

#: A layer: (block index, subset name).
Layer = tuple[int, str]


class LRPQViTArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    budget: float | None = Field(default=None, ge=2, le=8)
    candidates: tuple[int, ...] | None = None
    activations: Literal["mixed", "fixed"] = "mixed"
    clip: float | None = Field(default=99.9, gt=50, le=100)
    batch_size: int = Field(default=16, ge=1)
    softmax_bits: int | None = Field(default=None, ge=2, le=8)

    @model_validator(mode="after")
    def _candidates(self) -> LRPQViTArgs:
        if self.candidates is not None:
            if not self.candidates or any(not 2 <= b <= 8 for b in self.candidates):
                raise ValueError(f"candidates must be bit-widths in 2..8, got {self.candidates}")
        return self


@register
class LRPQViT(Method):
    """Relevance-scored per-layer bits within a budget; clipped, reparameterized LayerNorm
    inputs; log√2 softmax. A quantizing step, the recipe's last."""

    name = "lrp_qvit"
    needs_calibration = True
    quantizes_weights = True
    handles_transitions = True
    Args: ClassVar[type[BaseModel]] = LRPQViTArgs

    def __init__(self, recipe, args) -> None:
        super().__init__(recipe, args)
        #: ``scores[(block, subset)]``: the layer's normalised relevance.
        self.scores: dict[Layer, float] = {}
        #: ``bits[(block, subset)]``: the layer's weight (and, ``mixed``, input) bits.
        self.bits: dict[Layer, int] = {}
        #: The biases the reparameterization created (Swin's patch merging ``reduction`` has
        #: none): a checkpoint carries them, its config cannot.
        self.created = ShiftState()

    @property
    def budget(self) -> float:
        return self.args.budget if self.args.budget is not None else self.recipe.weights.bits

    @property
    def candidates(self) -> tuple[int, ...]:
        if self.args.candidates is not None:
            return tuple(sorted(set(self.args.candidates)))
        centre = round(self.budget)
        return tuple(b for b in range(centre - 1, centre + 3) if 2 <= b <= 8)

    def check(self, model, adapter: ModelAdapter) -> None:
        super().check(model, adapter)
        check_reconstruction_step(self.recipe, self.name, adapter, "LRP-QViT", "the log√2 one",
                                  does="allocates bits over Vision Transformer layers")  # fmt: skip
        low, high = min(self.candidates), max(self.candidates)
        if not low <= self.budget <= high:
            raise RecipeError(
                f"recipe '{self.recipe.name}', step '{self.name}': a budget of "
                f"{self.budget:g} bits is outside the candidates "
                f"{list(self.candidates)}"
            )

    def prepare_model(
        self, model, adapter: ModelAdapter, calibration: Tensor, *, progress: bool = False
    ) -> None:
        """Score every layer by relevance on the calibration images, allocate the bits, then
        give every block an uncalibrated log√2 softmax quantizer. The layers are the blocks'
        subsets and, where the recipe quantizes them, those of the transitions between blocks
        (Swin's patch merging, keyed by the block it follows)."""
        inputs, sizes = {}, {}
        for index, module, subsets in quantized_layers(model, adapter, self.recipe):
            for subset in subsets:
                inputs[(index, subset.name)] = module.get_submodule(subset.linears[0])
                sizes[(index, subset.name)] = sum(
                    module.get_submodule(name).weight.numel() for name in subset.linears
                )
        relevance = input_relevance(model, adapter, list(inputs.values()), calibration,
                                    self.args.batch_size)  # fmt: skip
        if not all(math.isfinite(r) for r in relevance):
            raise NonFiniteError(
                "LRP-QViT: the relevance is NaN/inf (non-finite activations or gradients in "
                "the float model on the calibration images)"
            )
        total = sum(relevance) or 1.0
        self.scores = {layer: r / total for layer, r in zip(inputs, relevance, strict=True)}
        self.bits = allocate_bits(self.scores, sizes, self.candidates, self.budget)
        counts = {b: sum(1 for v in self.bits.values() if v == b) for b in self.candidates}
        log.info("LRP-QViT: layers per bit-width %s (budget %g)", counts, self.budget)
        bits = self.args.softmax_bits or self.recipe.activations.bits
        install_softmax_quantizers(model, adapter, lambda: LogSqrt2Quantizer(bits))

    def apply(self, ctx: BlockContext) -> None:
        spec = self.recipe.activations.spec("activation")
        weight_spec = self.recipe.weights.spec("weight")
        for subset in ctx.adapter.subsets:
            bits = self.bits[(ctx.index, subset.name)]
            input_spec = replace(spec, bits=bits) if self.args.activations == "mixed" else spec
            if subset.prev_kind == "norm":
                rows = calibration_rows(ctx.capture(subset.linears[0], "input"))
                channel = replace(input_spec, granularity=PerColumn())
                if self.args.clip is not None:
                    channel = replace(channel, range_method="percentile", percentile=self.args.clip)
                per_channel = static_qparams(rows, channel)
                biasless = [n for n in subset.linears if ctx.block.get_submodule(n).bias is None]
                reparameterize_norm_input(ctx.block, ctx.adapter, subset, per_channel, input_spec)
                for name in biasless:
                    path = f"{ctx.module_path()}.{name}"
                    self.created.biased[path] = ctx.block.get_submodule(name)
            else:
                for name in subset.linears:
                    set_input_bits(ctx.block.get_submodule(name), input_spec.bits)
        for subset in ctx.adapter.subsets:  # every reparameterization saw float weights
            spec = replace(weight_spec, bits=self.bits[(ctx.index, subset.name)])
            for name in subset.linears:
                module = ctx.block.get_submodule(name)
                round_weight_(module, linear_weight(module, False), spec)

    def bits_label(self) -> str:
        """``W4A4 mixed`` (weights and inputs averaging the budget), ``W4A4 mixed W`` (inputs at
        the recipe's bits), ``W4A4`` (one candidate: no mixing)."""
        if len(self.candidates) == 1:
            return f"W{self.budget:g}A{self.recipe.activations.bits}"
        if self.args.activations == "mixed":
            return f"W{self.budget:g}A{self.budget:g} mixed"
        return f"W{self.budget:g}A{self.recipe.activations.bits} mixed W"

    def weight_bits(self, model, adapter: ModelAdapter) -> float | None:
        """Stored bits per weight of the linears the bits were allocated over (the blocks',
        and the quantized transitions'), read from the grids each was rounded to (``None`` on
        a model not yet compressed: the recipe's spec stands in)."""
        weights = bits = 0
        for _index, parent, subsets in quantized_layers(model, adapter, self.recipe):
            for name in (name for subset in subsets for name in subset.linears):
                module = parent.get_submodule(name)
                grid = weight_grid(module)
                if grid is None:
                    return None
                rows, cols = module.weight.shape
                weights += rows * cols
                bits += stored_bits(rows, cols, grid.spec)
        return bits / weights

    def saved_state(self) -> dict[str, Tensor]:
        return self.created.saved()

    def restore(self, model, adapter: ModelAdapter, state: dict[str, Tensor]) -> None:
        self.created = restore_shift_state(model, state, adapter.transposed_weights)


def quantized_layers(
    model: nn.Module, adapter: ModelAdapter, recipe
) -> Iterator[tuple[int, nn.Module, tuple]]:
    """``(index, module, subsets)`` for every block, then every transition between blocks the
    recipe quantizes (:func:`~channelwise.methods.registry.quantizes_transitions`; ``index``:
    the block it follows)."""
    for index, block in enumerate(adapter.block_list(model)):
        yield index, block, adapter.subsets
    if quantizes_transitions(recipe):
        for index, path in adapter.transitions:
            yield index, model.get_submodule(path), adapter.transition_subsets


def input_relevance(
    model: nn.Module, adapter: ModelAdapter, modules: list[nn.Module], pixels: Tensor,
    batch_size: int, absolute: bool = True,
) -> list[float]:  # fmt: skip
    """The relevance reaching each module's input, summed over the calibration images: the sum
    of ``|x ⊙ ∂L/∂x|`` (``absolute``; else signed) with ``L = ½·Σ f²``, ``f`` the last block's
    output, under conservative propagation (LayerNorm deviations and attention probabilities
    held constant); in a network without biases and with a linear MLP activation,
    ``x ⊙ ∂L/∂x`` then sums to ``Σ f²`` at any cut through the residual stream (tested)."""
    blocks = adapter.block_list(model)
    attentions = [block.get_submodule(adapter.attention_module) for block in blocks]
    captured: dict[int, Tensor] = {}
    last: list[Tensor] = []

    def grab(index: int):
        def hook(_module, args):
            captured[index] = args[0]

        return hook

    handles = [m.register_forward_pre_hook(grab(i)) for i, m in enumerate(modules)]
    handles.append(
        blocks[-1].register_forward_hook(lambda _m, _a, out: last.append(hidden_state(out)))
    )
    totals = [0.0] * len(modules)
    try:
        with layer_norm_deviation_detached(model), probabilities_detached(model, attentions):
            with torch.enable_grad():
                for start in range(0, pixels.shape[0], batch_size):
                    captured.clear()
                    last.clear()
                    batch = pixels[start : start + batch_size].detach().requires_grad_(True)
                    adapter.run(model, batch)
                    loss = 0.5 * last[0].float().square().sum()
                    inputs = [captured[i] for i in range(len(modules))]
                    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
                    for i, (x, g) in enumerate(zip(inputs, grads, strict=True)):
                        if g is None:
                            continue
                        r = x.detach().double() * g.double()
                        totals[i] += float(r.abs().sum() if absolute else r.sum())
    finally:
        for handle in handles:
            handle.remove()
    return totals


@contextmanager
def layer_norm_deviation_detached(model: nn.Module) -> Iterator[None]:
    """Inside, every ``nn.LayerNorm`` of ``model`` divides by a standard deviation that
    carries no gradient (the same values; conservative LRP's LayerNorm rule)."""
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    for norm in norms:
        norm.forward = _detached_forward(norm)
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward


def _detached_forward(norm: nn.LayerNorm):
    dims = tuple(range(-len(norm.normalized_shape), 0))

    def forward(x: Tensor) -> Tensor:
        centred = x - x.mean(dim=dims, keepdim=True)
        deviation = torch.sqrt(centred.square().mean(dim=dims, keepdim=True) + norm.eps)
        out = centred / deviation.detach()
        if norm.weight is not None:
            out = out * norm.weight
        if norm.bias is not None:
            out = out + norm.bias
        return out

    return forward


def allocate_bits(
    scores: dict[Layer, float], sizes: dict[Layer, int], candidates: tuple[int, ...],
    budget: float,
) -> dict[Layer, int]:  # fmt: skip
    """Per-layer bits from ``candidates`` minimising ``Σ S_l·4^(−b_l)`` under
    ``Σ n_l·b_l ≤ budget·Σ n_l``: every layer starts at the lowest candidate, then the upgrade
    (to the next candidate) removing the most noise per added weight bit is taken while it
    fits. Zero scores everywhere: every layer at the largest candidate within the budget."""
    levels = sorted(set(candidates))
    if not levels or budget < levels[0]:
        raise RecipeError(f"a budget of {budget:g} bits is below every candidate {levels}")
    allowed = budget * sum(sizes.values())
    if not any(scores.values()):
        uniform = max(b for b in levels if b <= budget)
        return {layer: uniform for layer in scores}
    step = dict.fromkeys(scores, 0)
    spent = levels[0] * sum(sizes.values())
    while True:
        best, best_gain = None, 0.0
        for layer, at in step.items():
            if at + 1 == len(levels):
                continue
            low, high = levels[at], levels[at + 1]
            cost = sizes[layer] * (high - low)
            if spent + cost > allowed + 1e-9:
                continue
            gain = scores[layer] * (4.0**-low - 4.0**-high) / cost
            if gain > best_gain:
                best, best_gain = layer, gain
        if best is None:
            break
        spent += sizes[best] * (levels[step[best] + 1] - levels[step[best]])
        step[best] += 1
    return {layer: levels[at] for layer, at in step.items()}
