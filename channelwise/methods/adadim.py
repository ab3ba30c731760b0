"""AdaDim: per linear, quantize per output channel or per input channel, whichever errs less.

Heo, Kim, Kwon, Kim, Kwon, Lee, "Rethinking Channel Dimensions to Isolate Outliers for Low-bit
Weight Quantization of Large Language Models", ICLR 2024 (arXiv 2309.15531).

Activation outliers live in a few *input* channels, so they scale whole columns of ``XWᵀ``'s
sensitivity. Per-OC quantization (the usual groups of ``g`` input channels inside each output
row) mixes such a column's weights with ordinary ones; per-IC quantization puts groups of ``g``
consecutive *output* channels inside each input column (asymmetric min-max scale + zero point per
group), so an outlier column gets scales of its own. For a weight ``(out, in)`` both give
``out · in / g`` scales: the same parameter count whenever ``g`` divides both dimensions.
Per-IC is not always better (weights have their own sensitivities), so AdaDim chooses per linear:

- For each linear of a block, in execution order, quantize it both ways (RTN) and keep the one
  whose output error is lower, measured where the paper measures it: at the attention output
  (the output of the attention's output projection) for q/k/v, at the MLP output (the down
  projection's output) for gate/up, at the linear's own output for o_proj/down_proj. Choices
  are sequential: linears chosen earlier in the block stay quantized when later ones are
  measured, and the reference is the block in that same state with the linear in float.
- ``quantizer: gptq`` (GPTQ-ada): the dimension is chosen with the RTN error as above, then the
  linear is GPTQ-quantized in that dimension (act-order by default); per-IC GPTQ quantizes each
  processed input column as a vector with groups along the outputs
  (:func:`channelwise.methods.gptq.gptq_quantize`). Hessians are observed per subset
  (true-sequential) after the earlier subsets are quantized.

Args: ``quantizer`` (``rtn`` | ``gptq``), ``error_samples`` (8); with ``gptq`` also ``damp``
(0.01), ``block_size`` (128), ``act_order`` (true), ``static_groups`` (true; per-OC only).
Cost: about ten forwards of the block on the error subsample per block (RTN), a few more with
GPTQ; on SmolLM2-135M with 8 error samples about 5 minutes of one shared CPU thread.

``choices[(block, linear)]`` holds ``"per_oc"``/``"per_ic"``; ``errors`` the two MSEs and
``input_ratio`` the linear input's per-channel abs-max ratio max/median; :meth:`AdaDim.summary`
prints them as a table.

Deviations and choices where the paper or its code is silent:

- Next block's inputs: the paper's code feeds the next block the float block output; our engine
  feeds the already-quantized outputs (as for every method here), so later blocks see and
  choose under the real quantization error.
- The o_proj/down_proj inputs and the MLP input are the block's *current* ones (with the
  earlier choices quantized), where the paper's code reuses the inputs captured from the float
  block. The measurement points are taken from the adapter: the ``*_in`` subset's linears are
  measured at the output of the matching ``*_out`` subset's linear (same tensor as the
  attention/MLP module output in every supported family), other linears at their own output.
- The error is measured on a subsample (``error_samples``: the first calibration batches holding
  at least that many sequences) to stay fast on a CPU; the paper uses every calibration sample.
  GPTQ Hessians use every calibration token.
- Asymmetric ranges include zero (project-wide convention); the paper's code uses raw min/max.
- Per-OC GPTQ uses the preset's static groups; per-IC scales are per column (no static groups),
  as in the paper's code. Group size 64, not 128 (the benchmark model is a Q4_1 g32 checkpoint
  and 128 does not divide SmolLM2's width); calibration is the protocol's, not Pile-val.
- Ties go to per-OC. The recipe's ``weights`` may be given per-OC (``channel`` / groups along
  input) or per-IC (``input_channel`` / groups along output); the other orientation is derived.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from channelwise.adapters import ModelAdapter, linear_weight
from channelwise.engine import BlockContext
from channelwise.errors import RecipeError
from channelwise.methods.gptq import (
    SharedInverse,
    gptq_quantize,
    is_per_column,
    observe_hessians,
)
from channelwise.methods.registry import Method, register
from channelwise.observe import ChannelStats
from channelwise.quant import QuantSpec, fake_quantize
from channelwise.quant.granularity import PerColumn, PerGroup, PerRow
from channelwise.quant.grid import record_grid, round_weight_

log = logging.getLogger(__name__)

Choice = Literal["per_oc", "per_ic"]
_GPTQ_ARGS = ("damp", "block_size", "act_order", "static_groups")


class AdaDimArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    quantizer: Literal["rtn", "gptq"] = "rtn"
    error_samples: int = Field(default=8, ge=1)
    damp: float = Field(default=0.01, ge=0)
    block_size: int = Field(default=128, ge=1)
    act_order: bool = True
    static_groups: bool = True

    @model_validator(mode="after")
    def _gptq_args_need_gptq(self) -> AdaDimArgs:
        given = sorted(set(_GPTQ_ARGS) & self.model_fields_set)
        if self.quantizer == "rtn" and given:
            raise ValueError(f"{', '.join(given)} only apply with quantizer: gptq")
        return self


def dimension_specs(spec: QuantSpec, where: str) -> dict[Choice, QuantSpec]:
    """The per-OC and per-IC versions of a weight spec (same bits, range and group size)."""
    g = spec.granularity
    pairs = {PerRow(): PerColumn(), PerColumn(): PerRow()}
    if g in pairs:
        other = pairs[g]
    elif isinstance(g, PerGroup):
        other = PerGroup(g.size, "output" if g.along == "input" else "input")
    else:
        raise RecipeError(
            f"{where}: AdaDim chooses between per-output- and per-input-channel scales, so the "
            f"weights need granularity channel, input_channel or group, not {g}"
        )
    derived = replace(spec, granularity=other)
    if is_per_column(spec):
        return {"per_oc": derived, "per_ic": spec}
    return {"per_oc": spec, "per_ic": derived}


def measure_point(adapter: ModelAdapter, name: str) -> str:
    """Where a linear's error is measured: the ``*_out`` linear of its branch, or itself."""
    by_name = {subset.name: subset for subset in adapter.subsets}
    for subset in adapter.subsets:
        if name in subset.linears and subset.name.endswith("_in"):
            out = by_name.get(subset.name.removesuffix("_in") + "_out")
            if out is not None and len(out.linears) == 1:
                return out.linears[0]
    return name


def _run_until(ctx: BlockContext, name: str, want: Literal["input", "output"]) -> list[Tensor]:
    """The named module's input or output per batch of ``ctx``; each forward stops there."""
    return ctx.capture(name, want)


def _mse(outputs: list[Tensor], reference: list[Tensor]) -> float:
    pairs = zip(outputs, reference, strict=True)
    total = sum((o.float() - r.float()).square().sum().item() for o, r in pairs)
    return total / sum(r.numel() for r in reference)


@register
class AdaDim(Method):
    """Per linear, per-OC or per-IC weight quantization by the lower block-output error."""

    name = "adadim"
    needs_calibration = True
    quantizes_weights = True
    Args = AdaDimArgs

    def __init__(self, recipe, args) -> None:
        super().__init__(recipe, args)
        self.choices: dict[tuple[int, str], Choice] = {}
        #: ``errors[(block, linear)] = {"per_oc": mse, "per_ic": mse}`` at the measure point.
        self.errors: dict[tuple[int, str], dict[Choice, float]] = {}
        #: Per-input-channel abs-max of the linear's input: max over channels / median.
        self.input_ratio: dict[tuple[int, str], float] = {}

    def check(self, model, adapter: ModelAdapter) -> None:
        super().check(model, adapter)
        where = f"recipe '{self.recipe.name}', step 'adadim'"
        specs = dimension_specs(self.recipe.weights.spec("weight"), where)
        block = adapter.block_list(model)[0]
        for name, module in adapter.block_linears(block).items():
            shape = tuple(linear_weight(module, adapter.transposed_weights).shape)
            for choice, spec in specs.items():
                try:
                    spec.granularity.block_shape(*shape)
                except RecipeError as exc:
                    raise RecipeError(
                        f"{where}: the {choice.replace('_', '-').upper()} alternative does not "
                        f"fit {adapter.blocks}.*.{name} {shape[0]}×{shape[1]}: {exc}"
                    ) from None

    def apply(self, ctx: BlockContext) -> None:
        where = f"recipe '{self.recipe.name}', step 'adadim'"
        specs = dimension_specs(self.recipe.weights.spec("weight"), where)
        sample = self._sample(ctx)
        self._record_input_ratios(sample)
        use_gptq = self.args.quantizer == "gptq"
        cached: dict[str, list[Tensor]] = {}  # measure point → its output in the current state
        for subset in ctx.adapter.subsets:
            if use_gptq:
                hessian = SharedInverse(
                    observe_hessians(ctx, (subset,))[subset.name], self.args.damp,
                    self.args.act_order, f"{ctx.adapter.block_path(ctx.index)}.{subset.linears[0]}",
                )  # fmt: skip
            for name in subset.linears:
                module = ctx.block.get_submodule(name)
                weight = linear_weight(module, ctx.adapter.transposed_weights)
                original = weight.clone()
                choice, outputs = self._choose(sample, name, weight, original, specs, cached)
                if use_gptq:
                    a = self.args
                    quantized, qparams = gptq_quantize(
                        original, hessian(), specs[choice], a.damp, a.block_size, a.act_order,
                        a.static_groups and choice == "per_oc",
                        name=f"{ctx.adapter.block_path(ctx.index)}.{name}",
                    )  # fmt: skip
                    weight.copy_(quantized.to(weight.dtype))
                    if qparams is not None:
                        record_grid(module, specs[choice], qparams)
                    cached.clear()  # the GPTQ weights differ from the measured RTN candidate
                else:
                    weight.copy_(original)
                    round_weight_(module, weight, specs[choice])
                    cached.clear()  # only this point's output is known in the new state
                    cached[measure_point(ctx.adapter, name)] = outputs
                self.choices[(ctx.index, name)] = choice
        picked = ", ".join(
            f"{name}={self.choices[(ctx.index, name)]}" for name in ctx.adapter.linear_names()
        )
        log.info("adadim block %d: %s", ctx.index, picked)

    def _sample(self, ctx: BlockContext) -> BlockContext:
        """``ctx`` restricted to the first batches holding ≥ ``error_samples`` sequences."""
        n, count = 0, 0
        while n < len(ctx.inputs) and count < self.args.error_samples:
            count += ctx.inputs[n].shape[0]
            n += 1
        return replace(ctx, inputs=ctx.inputs[:n], kwargs=ctx.kwargs[:n])

    def _record_input_ratios(self, sample: BlockContext) -> None:
        observed = {subset.linears[0]: subset for subset in sample.adapter.subsets}
        stats = {name: ChannelStats() for name in observed}
        sample.observe(tuple(observed), lambda name, x: stats[name].update(x))
        for first, subset in observed.items():
            absmax = stats[first].absmax
            median = absmax.median().item()
            ratio = absmax.max().item() / median if median > 0 else float("inf")
            for name in subset.linears:
                self.input_ratio[(sample.index, name)] = ratio

    def _choose(
        self,
        sample: BlockContext,
        name: str,
        weight: Tensor,
        original: Tensor,
        specs: dict[Choice, QuantSpec],
        cached: dict[str, list[Tensor]],
    ) -> tuple[Choice, list[Tensor]]:
        """Try both dimensions (RTN) on ``weight`` in place; restore it; return the winner."""
        point = measure_point(sample.adapter, name)
        if point == name:  # own output: the linear on its current input, no forward needed
            module = sample.block.get_submodule(name)
            inputs = _run_until(sample, name, "input")
            reference = [module(x) for x in inputs]

            def outputs() -> list[Tensor]:
                return [module(x) for x in inputs]
        else:
            reference = cached.get(point) or _run_until(sample, point, "output")

            def outputs() -> list[Tensor]:
                return _run_until(sample, point, "output")

        errors: dict[Choice, float] = {}
        results: dict[Choice, list[Tensor]] = {}
        with torch.no_grad():
            for choice, spec in specs.items():
                weight.copy_(fake_quantize(original, spec))
                results[choice] = outputs()
                errors[choice] = _mse(results[choice], reference)
            weight.copy_(original)
        choice: Choice = "per_ic" if errors["per_ic"] < errors["per_oc"] else "per_oc"
        self.errors[(sample.index, name)] = errors
        return choice, results[choice]

    def summary(self) -> str:
        """A table of every choice: block, linear, choice, both errors, input outlier ratio."""
        lines = [
            f"{'block':>5}  {'linear':<28} {'choice':<7} {'mse per-OC':>11} {'mse per-IC':>11} "
            f"{'in max/med':>10}"
        ]
        for (index, name), choice in self.choices.items():  # execution order
            err = self.errors[(index, name)]
            ratio = self.input_ratio.get((index, name), float("nan"))
            lines.append(
                f"{index:>5}  {name:<28} {choice:<7} {err['per_oc']:>11.3e} "
                f"{err['per_ic']:>11.3e} {ratio:>10.1f}"
            )
        picked = sum(choice == "per_ic" for choice in self.choices.values())
        lines.append(f"per-IC chosen for {picked} of {len(self.choices)} linears")
        return "\n".join(lines)
