"""LPViT: block pruning of a Vision Transformer's linears, allocated by distortion curves.

Xu, Li, Wu, Lin, Chen, Hu, Han, Li, "LPViT: Low-Power Semi-structured Pruning for Vision
Transformers", ECCV 2024, arXiv 2407.02068 (official code ``Akimoto-Cris/LPViT``).

Every block linear's weight is cut into ``bh × bw`` blocks. With the gradient ``g`` of a
label-free loss, ``mean(f(x)²)`` over the backbone's output on the calibration images, a block
scores ``mean|W ⊙ g|``; pruning a fraction ``a`` of a layer's blocks removes its lowest-scoring
ones and costs the distortion ``D(a) = mean((ΔW ⊙ g)²)``, tabulated for ``a`` on a grid. Each
layer then takes the amount where the slope of its curve (a 5-point finite difference) is
closest to a common ``2^t``, and ``t`` is bisected until the kept share of the block linears'
FLOPs meets the target (a linear's FLOPs per image: its weights times the tokens its block
processes, which differ between a Swin's stages). The pruned blocks are zeroed in the weights;
:func:`~channelwise.deploy.block_sparse.block_sparse_model` turns the linears into block-sparse
ones that skip them.

Arguments: ``flops`` (the share of the block linears' FLOPs kept, default 0.5), ``block``
(``[bh, bw]``, default 16 × 16 as for DeiT-S), ``grid`` (curve points, 101), ``batch_size``,
``allocation`` (``curves``, the paper's, or ``uniform``: every linear pruned alike, the
ablation), ``reconstruct_iters`` (default 0; ``lr``, ``seed``): block-output reconstruction of
the kept weights after pruning (:mod:`channelwise.reconstruct`, as I&S-ViT trains its blocks),
a post-training stand-in for the paper's fine-tuning; ``finetune_steps`` (default 0;
``finetune_lr``, ``finetune_targets``): after every block is pruned, the whole backbone
fine-tuned by distillation from the float model on the calibration images
(:func:`channelwise.distill.distill`), the pruned blocks held at zero; its targets are the last
hidden state (``output``, the default) or every block's output too (``blocks``, layer-wise).

Deviations from the paper and the official code:

- Only the blocks' linears are pruned (the patch embedding and the head stay dense).
- ``f`` in the label-free loss is the last block's output, before the backbone's final
  LayerNorm: the paper differentiates a classifier's logits, and a headless backbone's
  LayerNorm output has a near-constant energy, whose gradient carries little signal.
- The hardware power term of the paper's objective (``λ·P(a)``) is left out: the target is
  FLOPs, which every kept block costs alike on a CPU.
- The paper fine-tunes the pruned network with labels on ImageNet; ``finetune_steps`` fine-tunes
  it by feature distillation on the calibration images (no labels, a few hundred steps), and
  the optional block-wise reconstruction is a post-training substitute. Neither is the paper's.
- The masks are computed for the whole model in ``prepare_model`` (the allocation is global)
  and applied block by block in ``apply``.
- The second-order term and the curves' EMA smoothing (options in the official code) are not
  used.
"""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from channelwise.adapters import ModelAdapter
from channelwise.distill import Targets, distill, teacher_features
from channelwise.engine import BlockContext, hidden_state
from channelwise.errors import RecipeError, UnsupportedModelError
from channelwise.methods.registry import Method, register
from channelwise.reconstruct import (
    FloatStream,
    Reconstruction,
    block_kwargs,
    linear_parameters,
    only_trainable,
    reconstruct_block,
    stacked_inputs,
    weight_masks,
)

MASK_ATTR = "_channelwise_block_mask"

#: Fewer calibration images than this, and fine-tuning fits them rather than the model.
FINETUNE_IMAGES = 1024

log = logging.getLogger(__name__)


class LPViTArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    flops: float = Field(default=0.5, gt=0, lt=1)
    block: tuple[int, int] = (16, 16)
    grid: int = Field(default=101, ge=11)
    batch_size: int = Field(default=16, ge=1)
    allocation: Literal["curves", "uniform"] = "curves"
    reconstruct_iters: int = Field(default=0, ge=0)
    lr: float = Field(default=4e-5, gt=0)
    finetune_steps: int = Field(default=0, ge=0)
    finetune_lr: float = Field(default=1e-4, gt=0)
    finetune_targets: Literal["output", "blocks"] = "output"
    seed: int = 0


@register
class LPViT(Method):
    """Gradient-scored block pruning, amounts allocated by slope-matched distortion curves."""

    name = "lpvit"
    needs_calibration = True
    Args: ClassVar[type[BaseModel]] = LPViTArgs

    def __init__(self, recipe, args) -> None:
        super().__init__(recipe, args)
        #: ``amounts[name]``: the share of that linear's blocks pruned (whole blocks, so the
        #: curve's level rounded down to a block count).
        self.amounts: dict[str, float] = {}
        #: The kept share of the block linears' FLOPs.
        self.kept_flops: float | None = None
        #: ``losses[block]``: the block-output loss before and after reconstruction.
        self.losses: dict[int, Reconstruction] = {}
        #: The distillation loss before and after fine-tuning (``finetune_steps``).
        self.finetune: Reconstruction | None = None
        self._teacher: tuple[nn.Module, Tensor, Targets] | None = None
        self._masks: dict[str, Tensor] = {}
        self._stream = FloatStream(self.args.batch_size)

    def check(self, model, adapter: ModelAdapter) -> None:
        where = f"recipe '{self.recipe.name}', step '{self.name}'"
        if adapter.modality != "vision" or adapter.transposed_weights:
            raise UnsupportedModelError(
                f"{where}: LPViT prunes Vision Transformer blocks; '{adapter.family}' is not one"
            )
        bh, bw = self.args.block
        if bh < 1 or bw < 1:
            raise RecipeError(f"{where}: block sizes must be positive, got {self.args.block}")
        block = adapter.block_list(model)[0]
        for name, module in adapter.block_linears(block).items():
            out_features, in_features = module.weight.shape
            if out_features % bh or in_features % bw:
                raise RecipeError(
                    f"{where}: {name} ({out_features}×{in_features}) does not split into "
                    f"{bh}×{bw} blocks; pick a block that divides every linear"
                )

    def prepare_model(
        self, model, adapter: ModelAdapter, calibration, *, progress: bool = False
    ) -> None:
        if self.args.finetune_steps:  # the dense model's features: the fine-tuning's targets
            if len(calibration) < FINETUNE_IMAGES:
                log.warning(
                    "LPViT fine-tunes %d steps on only %d calibration images (%.0f passes over "
                    "each); give it at least %d (its figures used 4,096: `channelwise vision "
                    "--calib-images 4096`, `channelwise quantize --calib-samples 4096`)",
                    self.args.finetune_steps, len(calibration),
                    self.args.finetune_steps * self.args.batch_size / len(calibration),
                    FINETUNE_IMAGES,
                )  # fmt: skip
            blocks = self.args.finetune_targets == "blocks"
            targets = teacher_features(model, adapter, calibration, self.args.batch_size, blocks)
            self._teacher = (model, calibration, targets)
        tokens = block_tokens(model, adapter, calibration[:1])
        linears, per_token = {}, {}  # FLOPs per image ∝ tokens × weights (Swin: per stage)
        for index, block in enumerate(adapter.block_list(model)):
            for name, module in adapter.block_linears(block).items():
                linears[f"{adapter.block_path(index)}.{name}"] = module
                per_token[f"{adapter.block_path(index)}.{name}"] = tokens[index]
        grads = label_free_gradients(model, adapter, list(linears.values()), calibration,
                                     self.args.batch_size)  # fmt: skip
        bh, bw = self.args.block
        levels = torch.linspace(0, 1, self.args.grid, dtype=torch.float64)
        curves, orders = {}, {}
        for (name, module), grad in zip(linears.items(), grads, strict=True):
            weight = module.weight.detach().double()
            score = block_means((weight * grad).abs(), bh, bw)
            energy = block_means((weight * grad).square(), bh, bw)
            curves[name], orders[name] = distortion_curve(score, energy, levels)
        sizes = {name: module.weight.numel() * per_token[name] for name, module in linears.items()}
        if self.args.allocation == "uniform":
            self.amounts = {name: 1 - self.args.flops for name in linears}
            self.kept_flops = self.args.flops
        else:
            self.amounts, self.kept_flops = allocate(curves, sizes, levels, self.args.flops)
        self._masks = {}
        kept = 0
        for name, module in linears.items():
            mask = block_mask(orders[name], self.amounts[name], bh, bw, module.weight.shape)
            self._masks[name] = mask
            self.amounts[name] = 1 - mask.float().mean().item()  # whole blocks: realised
            kept += int(mask.sum()) * per_token[name]
        self.kept_flops = kept / sum(sizes.values())
        self._stream = FloatStream(self.args.batch_size)

    def apply(self, ctx: BlockContext) -> None:
        """Zero the block's pruned weight blocks; with ``reconstruct_iters``, then train its kept
        weights to reproduce the dense block's outputs (on the pruned model's inputs); with
        ``finetune_steps``, after the last block, fine-tune the whole backbone."""
        block_linears = ctx.adapter.block_linears(ctx.block)
        prefix = f"{ctx.adapter.block_path(ctx.index)}."
        masks = [self._masks[prefix + name].to(ctx.device) for name in block_linears]
        linears = list(block_linears.values())
        if self.args.reconstruct_iters:
            _, targets = self._stream.step(ctx)  # the dense block's outputs
        with torch.no_grad():
            for module, mask in zip(linears, masks, strict=True):
                module.weight.mul_(mask.to(module.weight.dtype))
                setattr(module, MASK_ATTR, mask)
        if self.args.reconstruct_iters:
            self._reconstruct(ctx, linears, masks, targets)
        if ctx.last and self._teacher is not None:
            self._finetune(ctx.adapter, ctx.progress)

    def _reconstruct(self, ctx: BlockContext, linears, masks, targets: Tensor) -> None:
        kwargs = block_kwargs(ctx)
        with weight_masks(linears, masks):
            self.losses[ctx.index] = reconstruct_block(
                ctx.block, linear_parameters(linears), stacked_inputs(ctx), kwargs, targets,
                iters=self.args.reconstruct_iters, batch_size=self.args.batch_size,
                lr=self.args.lr, seed=self.args.seed, progress=ctx.progress,
            )  # fmt: skip
        with torch.no_grad():
            for module, mask in zip(linears, masks, strict=True):
                module.weight.mul_(mask.to(module.weight.dtype))

    def _finetune(self, adapter: ModelAdapter, progress: bool) -> None:
        """Distil the whole pruned backbone from the dense one, the pruned blocks held at 0."""
        model, pixels, targets = self._teacher
        self._teacher = None
        blocks = adapter.block_list(model)
        linears = [m for block in blocks for m in adapter.block_linears(block).values()]
        masks = [getattr(m, MASK_ATTR) for m in linears]
        with weight_masks(linears, masks):
            self.finetune = distill(
                model, adapter, pixels, targets,
                [p for block in blocks for p in block.parameters()],
                steps=self.args.finetune_steps, batch_size=self.args.batch_size,
                lr=self.args.finetune_lr, seed=self.args.seed, progress=progress,
            )  # fmt: skip
        with torch.no_grad():
            for module, mask in zip(linears, masks, strict=True):
                module.weight.mul_(mask.to(module.weight.dtype))


def label_free_gradients(
    model: nn.Module, adapter: ModelAdapter, linears: list[nn.Module], pixels: Tensor, batch: int
) -> list[Tensor]:
    """Each linear's weight gradient of ``mean(f(x)²)``, ``f`` the last block's output (before
    the backbone's final LayerNorm), averaged over the calibration batches, float64."""
    sums = [torch.zeros_like(m.weight, dtype=torch.float64) for m in linears]
    weights = [m.weight for m in linears]
    batches = 0
    last: list[Tensor] = []
    handle = adapter.block_list(model)[-1].register_forward_hook(
        lambda _m, _a, out: last.append(hidden_state(out))
    )
    try:
        with only_trainable(model, weights):
            for start in range(0, pixels.shape[0], batch):
                last.clear()
                adapter.run(model, pixels[start : start + batch])
                loss = last[0].float().square().mean()
                for total, grad in zip(sums, torch.autograd.grad(loss, weights), strict=True):
                    total += grad.double()
                batches += 1
    finally:
        handle.remove()
    return [total / batches for total in sums]


def block_tokens(model: nn.Module, adapter: ModelAdapter, pixels: Tensor) -> list[int]:
    """The number of tokens each block processes per image (the same in every block of a ViT;
    a Swin's halve, four times fewer, at each patch merging)."""
    counts: list[int] = []
    handles = [
        block.register_forward_pre_hook(
            lambda _m, args, kwargs: counts.append(
                (args[0] if args else kwargs["hidden_states"]).shape[1]
            ),
            with_kwargs=True,
        )
        for block in adapter.block_list(model)
    ]
    try:
        with torch.no_grad():
            adapter.run(model, pixels)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def block_means(values: Tensor, bh: int, bw: int) -> Tensor:
    """``(out/bh, in/bw)`` means of ``values`` over its ``bh × bw`` blocks."""
    rows, cols = values.shape
    return values.reshape(rows // bh, bh, cols // bw, bw).mean(dim=(1, 3))


def distortion_curve(score: Tensor, energy: Tensor, levels: Tensor) -> tuple[Tensor, Tensor]:
    """``D(a)`` at each level ``a`` (pruning the ``⌊a·N⌋`` lowest-scoring of ``N`` blocks:
    the mean of their ``(W ⊙ g)²`` over the whole weight) and the blocks' order, lowest
    score first."""
    order = torch.argsort(score.reshape(-1), stable=True)
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64),
                            energy.reshape(-1)[order].cumsum(0)])  # fmt: skip
    count = order.numel()
    pruned = torch.floor(levels * count + 1e-9).long()
    return cumulative[pruned] / count, order


def slopes(curve: Tensor, step: float) -> Tensor:
    """The 5-point central finite difference of ``curve`` (one-sided near the ends)."""
    d = torch.empty_like(curve)
    d[2:-2] = (-curve[4:] + 8 * curve[3:-1] - 8 * curve[1:-3] + curve[:-4]) / (12 * step)
    d[:2] = (curve[1:3] - curve[:2]) / step
    d[-2:] = (curve[-2:] - curve[-3:-1]) / step
    return d


def allocate(
    curves: dict[str, Tensor], sizes: dict[str, int], levels: Tensor, target: float,
    tolerance: float = 0.02,
) -> tuple[dict[str, float], float]:  # fmt: skip
    """Per-layer pruning amounts: for a common ``λ = 2^t`` each layer takes the level whose
    slope is closest to ``λ``; ``t`` is bisected until the kept FLOPs share (``sizes``: each
    layer's FLOPs per image, weights × tokens) is within ``tolerance`` of ``target`` (or the
    closest reachable)."""
    step = float(levels[1] - levels[0])
    derivative = {name: slopes(curve, step) for name, curve in curves.items()}
    total = sum(sizes.values())

    def amounts_at(t: float) -> tuple[dict[str, float], float]:
        lam = 2.0**t
        chosen = {name: float(levels[int(torch.argmin((d - lam).abs()))])
                  for name, d in derivative.items()}  # fmt: skip
        kept = sum((1 - chosen[name]) * sizes[name] for name in chosen) / total
        return chosen, kept

    positive = torch.cat([d[d > 0] for d in derivative.values()])
    if positive.numel() == 0:  # no gradient signal: prune uniformly
        amount = float(levels[int(torch.argmin((levels - (1 - target)).abs()))])
        return {name: amount for name in curves}, 1 - amount
    low = float(torch.log2(positive.min())) - 2  # small λ: little pruned
    high = float(torch.log2(positive.max())) + 2  # large λ: much pruned
    best = amounts_at(low)
    for _ in range(60):
        middle = (low + high) / 2
        chosen, kept = amounts_at(middle)
        if abs(kept - target) < abs(best[1] - target):
            best = (chosen, kept)
        if abs(kept - target) <= tolerance / 4:
            break
        if kept > target:
            low = middle
        else:
            high = middle
    return best


def block_mask(order: Tensor, amount: float, bh: int, bw: int, shape) -> Tensor:
    """The keep mask of a weight of ``shape``: its ``⌊amount·N⌋`` lowest-scoring blocks
    (``order``, lowest first) are 0."""
    rows, cols = shape
    keep = torch.ones(order.numel(), dtype=torch.bool)
    keep[order[: int(amount * order.numel() + 1e-9)]] = False
    grid = keep.reshape(rows // bh, cols // bw)
    return grid.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
