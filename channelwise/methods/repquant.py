"""RepQuant: learnable per-channel dual clipping, scale reparameterization, weight reconstruction.

Li, Liu, Zhang, Gu, "RepQuant: Towards Accurate Post-Training Quantization of Large Transformer
Models via Scale Reparameterization", arXiv 2402.05628 (no official code).

RepQuant decouples the quantizers used while calibrating from those used at inference. While
calibrating, post-LayerNorm activations (the inputs of q/k/v and fc1) are quantized per channel,
each channel with a lower and an upper clipping bound that are *learned*
(:class:`~channelwise.quant.clipping.ClippingQuantizer`), and post-softmax probabilities with
the log√2 quantizer. For inference the per-channel grids are reparameterized into the LayerNorm
and the next linears, leaving one per-tensor grid with the same codes
(:func:`~channelwise.methods.repq_vit.reparameterize_norm_input`), and log√2 into log2 with a
√2 multiplier (the same values: :func:`~channelwise.quant.attention.log2_shift_matmul`).
Quantized weight reconstruction is integrated into the procedure. Per block:

1. the recipe's activation quantizers are calibrated, the q/k/v and fc1 inputs per channel;
2. each of those per-channel quantizers gets learnable bounds, trained on the block-output
   reconstruction loss (float weights, the quantized model's block inputs, the float model's
   block outputs as targets; Adam at ``clip_lr``, cosine to 0);
3. the learned grids are reparameterized to per tensor (exact in float);
4. the reparameterized weights get their per-output-channel grids, are trained through them on
   the same loss (``lr``), and rounded
   (:func:`~channelwise.reconstruct.quantize_weights_by_reconstruction`).

In a recipe it is the one, last step::

    weights: {bits: 4, symmetric: false, granularity: channel, range: mse}
    activations: {bits: 4, symmetric: false, granularity: tensor, dynamic: false, range: mse}
    attention: {q: …, k: …, v: …}          # per tensor, static
    steps: [{method: repquant}]

Arguments: ``iters`` per stage (default 1000 at ≤ 4-bit activations, 200 above: I&S-ViT's
counts, as RepQuant's were not retrieved), ``batch_size`` (64), ``lr`` (4e-5, the weights),
``clip_lr`` (1e-2, the clipping factors), ``seed``, ``softmax`` (``log_sqrt2`` or ``none``: the
recipe's ``attention.probs`` quantizer, if any), ``softmax_bits``, ``clipping`` and
``reconstruct_weights`` (false: skip stage 2 or the training of stage 4, for the ablation).

Deviations and readings of the paper (its text beyond the abstract was not retrieved):

- The clipping bounds are the calibrated per-channel range times a learnable factor each (α for
  the lower, β for the upper bound, both starting at 1), as OmniQuant's learnable weight
  clipping parameterizes them (and with its learning rate, 1e-2: on DINOv2-S's calibration
  images, 100 iterations at 1e-3 lowered the block losses by under 1%, at 1e-2 by 8–31%); the
  paper's parameterization and initialisation may differ.
- The bounds are learned with float weights before the reparameterization, and the weights are
  reconstructed after it (the order the method's description implies: the weights that are
  quantized are the reparameterized ones); the stage schedule, iteration counts and learning
  rates are this implementation's.
- Where the learned bounds end with a higher block-output loss on all calibration samples than
  the calibrated ones (stochastic mini-batches can), the calibrated bounds are kept.
- Only the linears' weights and biases are trained in the weight stage; the other activation
  quantizers keep their calibrated (``range``) grids.
- ``z̃`` is rounded to an integer, so the reparameterization is exactly code-preserving.
- A Swin's patch merging, which is no block, is quantized as RepQ-ViT does it (no learned
  clipping, no training: :class:`~channelwise.methods.repq_vit.RepQViTTransition`).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from channelwise.adapters import ModelAdapter
from channelwise.calibrate import quantize_block_activations
from channelwise.engine import BlockContext
from channelwise.methods.ias_vit import check_reconstruction_step
from channelwise.methods.registry import Method, register
from channelwise.methods.repq_vit import (
    RepQViTTransition,
    install_softmax_quantizers,
    reparameterize_norm_input,
)
from channelwise.quant.activation import input_quantizer, install_input_quantizer
from channelwise.quant.attention import LogSqrt2Quantizer
from channelwise.quant.clipping import MIN_FACTOR, ClippingQuantizer
from channelwise.reconstruct import (
    FloatStream,
    Reconstruction,
    block_kwargs,
    quantize_weights_by_reconstruction,
    reconstruct_block,
    stacked_inputs,
)


class RepQuantArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    iters: int | None = Field(default=None, ge=0)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=4e-5, gt=0)
    clip_lr: float = Field(default=1e-2, gt=0)
    seed: int = 0
    softmax: Literal["log_sqrt2", "none"] = "log_sqrt2"
    softmax_bits: int | None = Field(default=None, ge=2, le=8)
    clipping: bool = True
    reconstruct_weights: bool = True


@register
class RepQuant(Method):
    """Learned per-channel dual clipping of post-LayerNorm inputs, reparameterized to per tensor;
    log√2 softmax; weights reconstructed and rounded."""

    name = "repquant"
    needs_calibration = True
    quantizes_weights = True
    handles_transitions = True
    Args: ClassVar[type[BaseModel]] = RepQuantArgs

    def __init__(self, recipe, args) -> None:
        super().__init__(recipe, args)
        #: ``losses[(block, stage)]``: the block-output loss before and after stage 2 or 4.
        self.losses: dict[tuple[int, int], Reconstruction] = {}
        #: ``factors[(block, subset)]``: the mean learned (lower, upper) clipping factors.
        self.factors: dict[tuple[int, str], tuple[float, float]] = {}
        self._model: nn.Module | None = None
        self._stream = FloatStream(self.args.batch_size)
        self._transition = RepQViTTransition(recipe)

    @property
    def iters(self) -> int:
        if self.args.iters is not None:
            return self.args.iters
        return 1000 if self.recipe.activations.bits <= 4 else 200

    def check(self, model, adapter: ModelAdapter) -> None:
        super().check(model, adapter)
        softmax = "the log√2 one" if self.args.softmax == "log_sqrt2" else None
        check_reconstruction_step(self.recipe, self.name, adapter, "RepQuant", softmax)

    def prepare_model(
        self, model, adapter: ModelAdapter, calibration, *, progress: bool = False
    ) -> None:
        self._model = model
        self._stream = FloatStream(self.args.batch_size)
        if self.args.softmax == "log_sqrt2":
            bits = self.args.softmax_bits or self.recipe.activations.bits
            install_softmax_quantizers(model, adapter, lambda: LogSqrt2Quantizer(bits))

    def apply(self, ctx: BlockContext) -> None:
        if ctx.is_transition:  # Swin's patch merging: not trained
            self._transition.apply(ctx)
            return
        kwargs = block_kwargs(ctx)
        inputs = stacked_inputs(ctx)
        _, targets = self._stream.step(ctx)  # the float block's outputs, before any change
        norm_subsets = [s for s in ctx.adapter.subsets if s.prev_kind == "norm"]
        per_channel = tuple(name for subset in norm_subsets for name in subset.linears)
        quantize_block_activations(self._model, ctx, self.recipe, per_channel)
        settings = {"batch_size": self.args.batch_size, "seed": self.args.seed}
        settings["progress"] = ctx.progress
        clippers = {}
        for subset in norm_subsets:  # one learnable grid per LayerNorm output
            linears = [ctx.block.get_submodule(name) for name in subset.linears]
            calibrated = input_quantizer(linears[0])
            clipper = ClippingQuantizer(calibrated.spec, calibrated.qparams)
            for linear in linears:
                install_input_quantizer(linear, clipper)
            clippers[subset.name] = clipper
        if self.args.clipping and self.iters:
            factors = [clipper.factors for clipper in clippers.values()]
            result = reconstruct_block(
                ctx.block, factors, inputs, kwargs, targets, iters=self.iters,
                lr=self.args.clip_lr, **settings,
            )  # fmt: skip
            if result.loss_after > result.loss_before:  # learned bounds worse: keep the calibrated
                for clipper in clippers.values():
                    clipper.factors.data.fill_(1.0)
                result = Reconstruction(result.loss_before, result.loss_before)
            self.losses[(ctx.index, 2)] = result
        spec = self.recipe.activations.spec("activation")
        for subset in norm_subsets:
            clipper = clippers[subset.name]
            lower, upper = clipper.factors.clamp(min=MIN_FACTOR).mean(dim=1).tolist()
            self.factors[(ctx.index, subset.name)] = (lower, upper)
            reparameterize_norm_input(ctx.block, ctx.adapter, subset, clipper.qparams, spec)
        iters = self.iters if self.args.reconstruct_weights else 0
        result = quantize_weights_by_reconstruction(
            ctx.block, list(ctx.adapter.block_linears(ctx.block).values()), inputs, kwargs,
            targets, self.recipe.weights.spec("weight"), iters=iters, lr=self.args.lr,
            **settings,
        )  # fmt: skip
        if result is not None:
            self.losses[(ctx.index, 4)] = result
        if ctx.last:
            self._model = None

    def saved_state(self) -> dict[str, Tensor]:
        return self._transition.saved_state()

    def restore(self, model, adapter: ModelAdapter, state: dict[str, Tensor]) -> None:
        self._transition.restore(model, adapter, state)
