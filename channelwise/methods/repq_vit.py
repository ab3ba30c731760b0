"""RepQ-ViT: scale reparameterization for post-LayerNorm activations and log√2 softmax.

Li, Xiao, Liu, Zhang, "RepQ-ViT: Scale Reparameterization for Post-Training Quantization of
Vision Transformers", ICCV 2023, arXiv 2212.08254.

Post-LayerNorm activations of ViTs vary wildly between channels, so a per-tensor quantizer wastes
its grid; a per-channel one has no integer kernel. RepQ-ViT calibrates per-channel ``(s, z)``
on the LayerNorm's output, then moves the per-channel part into the model, exactly in float:
``s̃ = mean(s)``, ``z̃ = round(mean(z))``, ``r1 = s/s̃``, ``r2 = z − z̃``;
LayerNorm ``γ ← γ/r1``, ``β ← (β + s⊙r2)/r1``; next linears ``W ← W·diag(r1)``,
``b ← b − W(s⊙r2)``. The per-tensor codes of the new activations with ``(s̃, z̃)`` are then the
per-channel codes of the old ones with ``(s, z)``. Post-softmax probabilities get the log√2
quantizer (:class:`~channelwise.quant.attention.LogSqrt2Quantizer`), which the paper
reparameterizes to a log2 one with a √2 multiplier for integer hardware (the same values:
:func:`~channelwise.quant.attention.log2_shift_matmul` multiplies the codes by integer values
that way, tested against the fake-quantized product; the model itself runs the fake-quantized
probabilities).

In a recipe, this step comes before the weight-quantizing step (which quantizes the
reparameterized weights per output channel)::

    activations: {bits: 4, symmetric: false, granularity: tensor, dynamic: false, range: mse}
    attention: {q: …, k: …, v: …}          # per tensor, static
    steps: [{method: repq_vit}, {method: rtn}]

The reparameterized inputs (of q/k/v and fc1) get this step's own static per-tensor quantizer
``(s̃, z̃)``; the other linear inputs take the recipe's ``activations`` quantizer.

Arguments: ``reparam`` (default true) and ``softmax`` (``log_sqrt2``, the paper's, or ``none``:
the recipe's ``attention.probs`` quantizer, if any) switch the two parts, for the paper's
ablation; ``softmax_bits`` (default: the activations' bits); ``target`` (``mean``, the paper's,
or ``median``: DopQ-ViT's MOSF, arXiv 2408.03291, as its v1 abstract states it).

What the target changes: with an integer ``z̃`` every ``(s̃, z̃)`` keeps the per-channel codes,
so with float weights the model is the same. ``s̃`` alone rescales every column of
``W·diag(r1)`` by one constant, which the per-output-channel weight grid follows: the same
quantized model. ``z̃`` does change it: the reparameterized input dequantizes to ``s̃(q − z̃)``,
so the quantized weights' error meets ``q − z̃``, and a ``z̃`` nearer the channels' typical
zero point (the median, when a few channels sit far off) leaves less of it (tested).

Deviations from the paper and the official code (``zkkli/RepQ-ViT``):

- The per-channel ``(s, z)`` come from the recipe's activation range method run per channel
  (``range: mse``: the MSE-best shrink of each channel's min–max range over an 80-point grid),
  not from the official search over three percentiles; weights are quantized by the recipe's
  quantizing step with its range method (per output channel).
- ``z̃`` is rounded to an integer, so the reparameterization is exactly code-preserving (the
  official code leaves it fractional).
- Every block is calibrated on the outputs of the already quantized blocks before it
  (the engine's order), as the official code's sequential initialisation does; the
  reparameterized weights are quantized once, after the reparameterization (the official code
  quantizes, reparameterizes, then re-initialises the weight quantizers: the same result).
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from channelwise.adapters import ModelAdapter
from channelwise.engine import BlockContext
from channelwise.errors import RecipeError, UnsupportedModelError
from channelwise.methods import registry
from channelwise.methods.registry import Method, register
from channelwise.methods.rtn import rtn_block
from channelwise.quant.activation import InputQuantizer, install_input_quantizer
from channelwise.quant.attention import (
    AttentionQuantizers,
    LogSqrt2Quantizer,
    install_attention_quantizers,
)
from channelwise.quant.core import QParams, QuantSpec, calibration_rows, static_qparams
from channelwise.quant.granularity import PerColumn, PerTensor
from channelwise.transforms.shift import ShiftState, restore_shift_state, shift_norm_output
from channelwise.transforms.smooth import fold_scales_into_norm


class RepQViTArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    reparam: bool = True
    softmax: Literal["log_sqrt2", "none"] = "log_sqrt2"
    softmax_bits: int | None = Field(default=None, ge=2, le=8)
    target: Literal["mean", "median"] = "mean"


@register
class RepQViT(Method):
    """Per-channel LayerNorm-output ranges reparameterized to per-tensor; log√2 softmax."""

    name = "repq_vit"
    needs_calibration = True
    handles_transitions = True
    quantizes_weights = False
    Args: ClassVar[type[BaseModel]] = RepQViTArgs

    def __init__(self, recipe, args) -> None:
        super().__init__(recipe, args)
        #: ``ratios[(block, subset)]``: max/min of ``r1`` (how far apart the channel scales were).
        self.ratios: dict[tuple[int, str], float] = {}
        #: The biases the reparameterization created on linears that had none (Swin's patch
        #: merging ``reduction``): a checkpoint carries them, its config cannot.
        self.created = ShiftState()

    def check(self, model, adapter: ModelAdapter) -> None:
        check_static_asymmetric(self.recipe, self.name)
        where = f"recipe '{self.recipe.name}', step '{self.name}'"
        attention = self.recipe.attention
        if self.args.softmax == "log_sqrt2" and attention is not None and attention.probs:
            raise RecipeError(
                f"{where}: the recipe's attention.probs quantizer would be replaced by the "
                "log√2 one; drop attention.probs, or set softmax: none to keep it"
            )
        if self.args.reparam:
            adapter.require_folding("RepQ-ViT's scale reparameterization")
            if adapter.norm_type != "layernorm":
                raise UnsupportedModelError(
                    f"{where}: the reparameterization folds per-channel zero points into the "
                    f"LayerNorm's bias and the next linears' biases; {adapter.family}'s "
                    f"{adapter.norm_type} has no bias (use smoothquant or osplus on this family)"
                )
        registry.check_transform_order(self.recipe, self.name, "the reparameterization")

    def prepare_model(
        self, model, adapter: ModelAdapter, calibration, *, progress: bool = False
    ) -> None:
        """Give every block's attention an uncalibrated log√2 probabilities quantizer; the block
        loop calibrates each on its block's quantized q and k."""
        if self.args.softmax == "log_sqrt2":
            bits = self.args.softmax_bits or self.recipe.activations.bits
            install_softmax_quantizers(model, adapter, lambda: LogSqrt2Quantizer(bits))

    def apply(self, ctx: BlockContext) -> None:
        if self.args.reparam:
            for subset in ctx.adapter.subsets:
                if subset.prev_kind == "norm":
                    self._reparameterize(ctx, subset)

    def _reparameterize(self, ctx: BlockContext, subset) -> None:
        spec = self.recipe.activations.spec("activation")
        rows = calibration_rows(ctx.capture(subset.linears[0], "input"))
        per_channel = static_qparams(rows, replace(spec, granularity=PerColumn()))
        biasless = [n for n in subset.linears if ctx.block.get_submodule(n).bias is None]
        ratio = reparameterize_norm_input(
            ctx.block, ctx.adapter, subset, per_channel, spec, self.args.target
        )
        self.ratios[(ctx.index, subset.name)] = ratio
        for name in biasless:
            self.created.biased[f"{ctx.module_path()}.{name}"] = ctx.block.get_submodule(name)

    def saved_state(self) -> dict[str, Tensor]:
        return self.created.saved()

    def restore(self, model, adapter: ModelAdapter, state: dict[str, Tensor]) -> None:
        self.created = restore_shift_state(model, state, adapter.transposed_weights)


class RepQViTTransition:
    """What a step that trains whole blocks (I&S-ViT, RepQuant) does with a module between
    blocks (Swin's patch merging), which is no block: RepQ-ViT's treatment, untrained. Its
    norm is reparameterized into its linear (per-channel input ranges to one static per-tensor
    grid; a bias created where the linear had none, kept as step state) and the weights are
    rounded on the recipe's grid, as the ``repq-vit`` presets do."""

    def __init__(self, recipe) -> None:
        self.recipe = recipe
        self.reparameterization = RepQViT(recipe, RepQViTArgs(softmax="none"))

    def apply(self, ctx: BlockContext) -> None:
        self.reparameterization.apply(ctx)
        rtn_block(ctx.block, ctx.adapter, self.recipe.weights.spec("weight"))

    def saved_state(self) -> dict[str, Tensor]:
        return self.reparameterization.saved_state()

    def restore(self, model, adapter: ModelAdapter, state: dict[str, Tensor]) -> None:
        self.reparameterization.restore(model, adapter, state)


def install_softmax_quantizers(model, adapter: ModelAdapter, make) -> None:
    """Give every block's attention a new, uncalibrated probabilities quantizer ``make()``; the
    block loop calibrates each on its block's quantized q and k."""
    for block in adapter.block_list(model):
        attention = block.get_submodule(adapter.attention_module)
        install_attention_quantizers(model, [attention], AttentionQuantizers(probs=make()))


def check_static_asymmetric(recipe, step: str) -> None:
    """Refuse a recipe whose activations are not static, asymmetric, with integer zero points
    and float32 scales (what the reparameterization needs to preserve codes)."""
    where = f"recipe '{recipe.name}', step '{step}'"
    activations = recipe.activations
    if activations is None or activations.dynamic or activations.symmetric:
        raise RecipeError(
            f"{where}: needs static asymmetric activations "
            "(activations: {bits: 4, symmetric: false, granularity: tensor, dynamic: false})"
        )
    if activations.zero_point != "integer" or activations.scale_dtype != "float32":
        raise RecipeError(
            f"{where}: the reparameterization preserves codes only with integer zero points "
            "and float32 scales (drop zero_point/scale_dtype from activations)"
        )


def reparameterize_norm_input(
    block,
    adapter: ModelAdapter,
    subset,
    per_channel: QParams,
    spec: QuantSpec,
    target: Literal["mean", "median"] = "mean",
) -> float:
    """Move per-channel input ranges ``(s, z)`` of ``subset``'s linears into its LayerNorm and the
    linears (exact in float), and give the linears one static per-tensor quantizer ``(s̃, z̃)``
    of ``spec`` whose codes equal the per-channel ones; ``s̃, z̃`` are the ``target`` (RepQ-ViT's
    mean, or DopQ-ViT's median) of ``s`` and ``z``. Returns ``max(r1)/min(r1)``."""
    linears = [block.get_submodule(name) for name in subset.linears]
    norm = block.get_submodule(subset.prev)
    s = per_channel.scale.reshape(-1)
    z = per_channel.zero_point.reshape(-1)
    centre = torch.median if target == "median" else torch.mean
    s_tilde = centre(s)
    z_tilde = torch.round(centre(z))
    r1 = s / s_tilde
    r2 = z - z_tilde
    transposed = adapter.transposed_weights
    shift_norm_output(norm, linears, -(s * r2), transposed)  # x + s⊙r2
    fold_scales_into_norm(norm, linears, r1, transposed)  # then / r1
    tensor_spec = replace(spec, granularity=PerTensor())
    qparams = QParams(s_tilde.reshape(1, 1), z_tilde.reshape(1, 1))
    for linear in linears:
        install_input_quantizer(linear, InputQuantizer(tensor_spec, qparams))
    return (r1.max() / r1.min()).item()
