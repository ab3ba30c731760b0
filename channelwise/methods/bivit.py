"""BiViT: a short quantization-aware training demonstration of binary Vision Transformers.

He, Lou, Qian, Zhuang, Li, "BiViT: Extremely Compressed Binary Vision Transformers", ICCV 2023,
arXiv 2211.07091 (code ``ThisisBillhe/BiViT``, partial). The building blocks are in
:mod:`channelwise.quant.binary`.

BiViT is quantization-aware *training*: the network is trained with its binarized parts in the
forward pass and straight-through gradients. Cross-layer binarization trains in two stages:

1. **Binary attention**: the q/k/v and output projections get binary weights
   ``α ⊙ sign(W − mean_row W)`` and sign inputs; q, k and v are binarized by sign; each row of
   attention probabilities by softmax-aware binarization ``1[a ≥ β·max(a)]``. The MLP stays
   float. The network is trained.
2. **Binary MLP weights**: fc1 and fc2 get binary weights too (their inputs stay float), and
   training continues.

Training is distillation from the float model (teacher) on the calibration images
(:func:`channelwise.distill.distill`); every block parameter is trained (latent weights, ``α``,
biases, LayerNorms, LayerScale), the embeddings stay frozen. At the end the binary weights are
written into the linears (``α·sign``) and the sign and binarizing quantizers stay installed.

In a recipe it is the only step, with no ``weights``/``activations``/``attention`` quantizers
(it binarizes by itself)::

    steps: [{method: bivit, args: {steps: 200}}]

Arguments: ``steps`` per stage (default 200), ``batch_size`` (32), ``lr`` (5e-4, the paper's),
``beta`` (0.25, the paper's; 0.25–0.45 work there), ``mlp`` (false: stage 1 only), ``seed``.

This is a demonstration, not the paper's training:

- The paper trains 300 epochs (150 + 150) on ImageNet with labels and knowledge distillation
  from a classifier's logits; here a few hundred steps on the calibration images, the loss the
  mean squared error between the student's and the float model's last hidden states (DINOv2 has
  no classifier; its probe is fitted on those features). Expect large losses of accuracy.
- ``sign(0)`` is +1, so activations take exactly two levels.
- The binary weights are stored as float ``α·sign`` values (a saved model is a fake-quant
  checkpoint): nothing packs them into bits or runs them on a binary kernel yet. Loading
  re-installs the sign inputs and the binarized attention from the recipe (``restore``).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.nn.utils import parametrize

from channelwise.adapters import ModelAdapter
from channelwise.distill import Targets, distill, teacher_features
from channelwise.engine import BlockContext
from channelwise.errors import RecipeError, UnsupportedModelError
from channelwise.methods.registry import Method, register
from channelwise.quant.attention import AttentionQuantizers, install_attention_quantizers
from channelwise.quant.binary import (
    BinaryWeight,
    SignQuantizer,
    SoftmaxBinarizer,
    install_sign_input,
)
from channelwise.reconstruct import Reconstruction


class BiViTArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(default=200, ge=0)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=5e-4, gt=0)
    beta: float = Field(default=0.25, gt=0, le=1)
    mlp: bool = True
    seed: int = 0


@register
class BiViT(Method):
    """Binary attention (weights, inputs, q/k/v, probabilities), then binary MLP weights, each
    stage trained by distillation from the float model."""

    name = "bivit"
    needs_calibration = True
    Args: ClassVar[type[BaseModel]] = BiViTArgs

    def __init__(self, recipe, args) -> None:
        super().__init__(recipe, args)
        #: ``losses[stage]``: the distillation loss on all calibration images, before and after.
        self.losses: dict[int, Reconstruction] = {}

    def check(self, model, adapter: ModelAdapter) -> None:
        where = f"recipe '{self.recipe.name}', step '{self.name}'"
        if adapter.modality != "vision" or adapter.transposed_weights:
            raise UnsupportedModelError(
                f"{where}: BiViT binarizes Vision Transformer blocks; '{adapter.family}' is not one"
            )
        recipe = self.recipe
        if recipe.weights or recipe.activations or recipe.attention or len(recipe.steps) != 1:
            raise RecipeError(
                f"{where}: BiViT binarizes weights, inputs and attention itself; it must be the "
                "recipe's only step, with no weights/activations/attention quantizers"
            )

    def prepare_model(
        self, model, adapter: ModelAdapter, calibration: Tensor, *, progress: bool = False
    ) -> None:
        targets = teacher_features(model, adapter, calibration, self.args.batch_size)
        blocks = adapter.block_list(model)
        attention, mlp = _split_linears(adapter, blocks)
        self._install_binary_attention(model, adapter)
        for linear in attention:
            parametrize.register_parametrization(linear, "weight", BinaryWeight(linear.weight))
        trained = lambda: [p for block in blocks for p in block.parameters()]  # noqa: E731
        self.losses[1] = self._train(model, adapter, calibration, targets, trained(), progress)
        binarized = list(attention)
        if self.args.mlp:
            for linear in mlp:
                parametrize.register_parametrization(linear, "weight", BinaryWeight(linear.weight))
            binarized += mlp
            self.losses[2] = self._train(model, adapter, calibration, targets, trained(), progress)
        for linear in binarized:  # write α·sign into the weight; α is folded away
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)

    def bits_label(self) -> str:
        return "W1A1 attention" + (", W1 MLP" if self.args.mlp else "")

    def weight_bits(self, model, adapter: ModelAdapter) -> float:
        """One bit per binary weight plus a float32 ``α`` per row; float MLP weights count 16."""
        block = adapter.block_list(model)[0]
        prefix = adapter.attention_module + "."
        weights = bits = 0
        for name, module in adapter.block_linears(block).items():
            rows, cols = module.weight.shape
            binary = name.startswith(prefix) or self.args.mlp
            weights += rows * cols
            bits += rows * (cols + 32) if binary else rows * cols * 16
        return bits / weights

    def apply(self, ctx: BlockContext) -> None:
        """Nothing per block: the whole network was trained in ``prepare_model``."""

    def restore(self, model, adapter: ModelAdapter, state) -> None:
        """A loaded model's weights are already binary: re-install the sign inputs and the
        binarized attention."""
        self._install_binary_attention(model, adapter)

    def _install_binary_attention(self, model, adapter: ModelAdapter) -> None:
        """Sign inputs on every attention linear; sign q/k/v and binarized probabilities."""
        blocks = adapter.block_list(model)
        for linear in _split_linears(adapter, blocks)[0]:
            install_sign_input(linear)
        modules = [block.get_submodule(adapter.attention_module) for block in blocks]
        entries = AttentionQuantizers(
            q=SignQuantizer(), k=SignQuantizer(), v=SignQuantizer(),
            probs=SoftmaxBinarizer(self.args.beta),
        )  # fmt: skip
        install_attention_quantizers(model, modules, entries)

    def _train(
        self, model, adapter, pixels: Tensor, targets: Targets, trained, progress: bool
    ) -> Reconstruction:
        args = self.args
        return distill(
            model, adapter, pixels, targets, trained, steps=args.steps,
            batch_size=args.batch_size, lr=args.lr, seed=args.seed, progress=progress,
        )  # fmt: skip


def _split_linears(adapter: ModelAdapter, blocks) -> tuple[list[nn.Module], list[nn.Module]]:
    """Every block's attention linears and its other (MLP) linears."""
    prefix = adapter.attention_module + "."
    attention, mlp = [], []
    for block in blocks:
        for name, module in adapter.block_linears(block).items():
            (attention if name.startswith(prefix) else mlp).append(module)
    return attention, mlp
