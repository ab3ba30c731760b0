"""I&S-ViT: the shift-uniform-log2 softmax quantizer and three-stage smooth block reconstruction.

Zhong, Hu, Lin, Chen, Ji, "I&S-ViT: An Inclusive & Stable Method for Pushing the Limit of
Post-Training ViTs Quantization", arXiv 2311.10126 (official code ``zysxmu/IaS-ViT``).

Two parts. **SULQ** quantizes post-softmax probabilities as ``log2(A + η)`` on a uniform grid
(:class:`~channelwise.quant.attention.ShiftLog2Quantizer`), so small probabilities are not all
clamped to one code as in a plain log2 grid. **Smooth optimization (SOS)** trains each block's
linear weights and biases to reproduce the float block's output, in three stages: (1) with its
activations quantized — the inputs of q/k/v and fc1 *per channel*, whose loss landscape is
smooth — and float weights, on the float model's block inputs; (2) the per-channel ranges are
reparameterized into the LayerNorm and the next linears, exactly as RepQ-ViT does
(:func:`~channelwise.methods.repq_vit.reparameterize_norm_input`), leaving per-tensor
quantizers with the same codes; (3) with the weights fake-quantized too (per output channel, on a
grid fixed at the start of the stage), on the quantized model's block inputs. Both stages use
the float model's block outputs as targets (:mod:`channelwise.reconstruct`). The weights are
then rounded onto their grid: this step quantizes the weights, so it is the recipe's last step::

    weights: {bits: 4, symmetric: false, granularity: channel, range: mse}
    activations: {bits: 4, symmetric: false, granularity: tensor, dynamic: false, range: mse}
    attention: {q: …, k: …, v: …}          # per tensor, static
    steps: [{method: ias_vit}]

Arguments: ``iters`` per reconstruction stage (default: the paper's 1000 at ≤ 4-bit
activations, 200 above), ``batch_size`` (64), ``lr`` (4e-5, cosine to 0), ``seed``,
``softmax`` (``sulq``, or ``none``: the recipe's ``attention.probs`` quantizer, if any),
``softmax_bits`` (default: the activations' bits), ``reconstruct`` (false: quantizers and
reparameterization only, for the ablation).

Deviations from the paper and the official code:

- Only the linears' weights and biases are trained; the official code also trains every other
  block parameter that is not a LayerNorm's or a quantizer's (for DINOv2 that would include
  LayerScale).
- Activation and weight ranges come from the recipe's range method (``range: mse``: the
  MSE-best shrink of the min–max range), not from the official percentile candidates; SULQ's
  shift ``η`` is searched over the official candidates.
- The straight-through gradient also passes through clipped values (the official code zeroes it
  there for activations).
- Activation ranges are calibrated on the whole calibration set, block by block on the quantized
  model's inputs (the engine's order), not on the first 64 images; the paper's 1,024 calibration
  images are ``--calib-images 1024``.
- The per-channel ranges are reparameterized with a rounded ``z̃`` (exactly code-preserving).
- A Swin's patch merging, which is no block, is quantized as RepQ-ViT does it and not trained
  (:class:`~channelwise.methods.repq_vit.RepQViTTransition`).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from channelwise.adapters import ModelAdapter
from channelwise.calibrate import quantize_block_activations
from channelwise.engine import BlockContext
from channelwise.errors import RecipeError, UnsupportedModelError
from channelwise.methods import registry
from channelwise.methods.registry import Method, register
from channelwise.methods.repq_vit import (
    RepQViTTransition,
    check_static_asymmetric,
    install_softmax_quantizers,
    reparameterize_norm_input,
)
from channelwise.quant.activation import input_quantizer
from channelwise.quant.attention import (
    ShiftLog2Quantizer,
)
from channelwise.reconstruct import (
    FloatStream,
    Reconstruction,
    block_kwargs,
    linear_parameters,
    quantize_weights_by_reconstruction,
    reconstruct_block,
    stacked_inputs,
)


def check_reconstruction_step(
    recipe, step: str, adapter: ModelAdapter, paper: str, softmax: str | None,
    does: str = "reconstructs Vision Transformer blocks",
) -> None:  # fmt: skip
    """Refuse what a weight-rounding ViT step with RepQ-ViT's reparameterization cannot do: a
    model that is not a Vision Transformer (the step ``does`` what only a ViT allows),
    activations the reparameterization cannot carry, a recipe ``attention.probs`` quantizer the
    step's own ``softmax`` quantizer would replace, or the step anywhere but last (it rounds
    the weights itself)."""
    where = f"recipe '{recipe.name}', step '{step}'"
    if adapter.modality != "vision" or adapter.transposed_weights:
        raise UnsupportedModelError(
            f"{where}: {paper} {does}; '{adapter.family}' is not one (use gptq or awq for a "
            "language model)"
        )
    check_static_asymmetric(recipe, step)
    attention = recipe.attention
    if softmax is not None and attention is not None and attention.probs:
        raise RecipeError(
            f"{where}: the recipe's attention.probs quantizer would be replaced by {softmax}; "
            "drop attention.probs, or set softmax: none to keep it"
        )
    steps = [s.method for s in recipe.steps]
    if steps[-1] != step or steps.count(step) != 1:
        raise RecipeError(
            f"{where}: {paper} rounds the weights itself, so it must be the last step "
            f"(and appear once); got steps {steps}"
        )
    adapter.require_folding(f"{paper}'s reparameterization")
    registry.check_transform_order(recipe, step, "the reconstruction")


class IaSViTArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    iters: int | None = Field(default=None, ge=0)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=4e-5, gt=0)
    seed: int = 0
    softmax: Literal["sulq", "none"] = "sulq"
    softmax_bits: int | None = Field(default=None, ge=2, le=8)
    reconstruct: bool = True


@register
class IaSViT(Method):
    """SULQ softmax quantizers and three-stage block reconstruction (weights quantized)."""

    name = "ias_vit"
    needs_calibration = True
    quantizes_weights = True
    handles_transitions = True
    Args: ClassVar[type[BaseModel]] = IaSViTArgs

    def __init__(self, recipe, args) -> None:
        super().__init__(recipe, args)
        #: ``losses[(block, stage)]``: the block-output loss before and after stage 1 or 3.
        self.losses: dict[tuple[int, int], Reconstruction] = {}
        self._model: nn.Module | None = None
        self._stream = FloatStream(self.args.batch_size)
        self._transition = RepQViTTransition(recipe)

    @property
    def iters(self) -> int:
        if not self.args.reconstruct:
            return 0
        if self.args.iters is not None:
            return self.args.iters
        return 1000 if self.recipe.activations.bits <= 4 else 200

    def check(self, model, adapter: ModelAdapter) -> None:
        super().check(model, adapter)
        softmax = "SULQ" if self.args.softmax == "sulq" else None
        check_reconstruction_step(self.recipe, self.name, adapter, "I&S-ViT", softmax)

    def prepare_model(
        self, model, adapter: ModelAdapter, calibration, *, progress: bool = False
    ) -> None:
        """Give every block's attention an uncalibrated SULQ probabilities quantizer."""
        self._model = model
        self._stream = FloatStream(self.args.batch_size)
        if self.args.softmax == "sulq":
            bits = self.args.softmax_bits or self.recipe.activations.bits
            install_softmax_quantizers(model, adapter, lambda: ShiftLog2Quantizer(bits))

    def apply(self, ctx: BlockContext) -> None:
        if ctx.is_transition:  # Swin's patch merging: not trained
            self._transition.apply(ctx)
            return
        kwargs = block_kwargs(ctx)
        quantized_inputs = stacked_inputs(ctx)
        float_inputs, targets = self._stream.step(ctx)  # the float block, before any change
        norm_subsets = [s for s in ctx.adapter.subsets if s.prev_kind == "norm"]
        per_channel = tuple(name for subset in norm_subsets for name in subset.linears)
        quantize_block_activations(self._model, ctx, self.recipe, per_channel)
        linears = list(ctx.adapter.block_linears(ctx.block).values())
        settings = {
            "iters": self.iters,
            "batch_size": self.args.batch_size,
            "lr": self.args.lr,
            "seed": self.args.seed,
            "progress": ctx.progress,
        }
        if self.iters:  # stage 1: per-channel activations, float weights, float inputs
            self.losses[(ctx.index, 1)] = reconstruct_block(
                ctx.block, linear_parameters(linears), float_inputs, kwargs, targets, **settings
            )
        spec = self.recipe.activations.spec("activation")
        for subset in norm_subsets:  # stage 2: per channel → per tensor, same codes
            first = ctx.block.get_submodule(subset.linears[0])
            reparameterize_norm_input(
                ctx.block, ctx.adapter, subset, input_quantizer(first).qparams, spec
            )
        # stage 3: weights quantized too, on the quantized model's inputs; then rounded
        result = quantize_weights_by_reconstruction(
            ctx.block, linears, quantized_inputs, kwargs, targets,
            self.recipe.weights.spec("weight"), **settings,
        )  # fmt: skip
        if result is not None:
            self.losses[(ctx.index, 3)] = result
        if ctx.last:
            self._model = None

    def saved_state(self) -> dict[str, Tensor]:
        return self._transition.saved_state()

    def restore(self, model, adapter: ModelAdapter, state: dict[str, Tensor]) -> None:
        self._transition.restore(model, adapter, state)
