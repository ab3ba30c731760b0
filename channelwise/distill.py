"""Whole-model feature distillation of a Vision Transformer backbone: train chosen parameters of
the compressed model so that its last hidden state approaches the float model's on the
calibration images.

Quantization-aware training (BiViT) and fine-tuning after pruning (LPViT) both train the whole
network end to end, where block reconstruction (:mod:`channelwise.reconstruct`) trains one block
at a time. The papers distil a classifier's logits on ImageNet with labels; a headless backbone
has no logits, and its linear probe is fitted on (and frozen over) its last hidden state, so the
loss here is the mean squared error of that state against the float model's. Adam with a cosine
learning rate decaying to 0, random mini-batches of the calibration images.

With ``blocks`` (:func:`teacher_features`), every block's output is a target too (layer-wise
distillation, as in structured pruning of language models, e.g. CoFi, arXiv 2204.00408): the
loss is then the mean over the targets of each one's squared error divided by the teacher's
mean square of it (block outputs grow with depth), a denser signal for a network whose every
block was pruned. Not in BiViT's or LPViT's papers, which distil logits with labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from channelwise.adapters import ModelAdapter
from channelwise.errors import NonFiniteError
from channelwise.quant.core import loss_checked_training
from channelwise.reconstruct import Reconstruction, only_trainable


@dataclass
class Targets:
    """The float model's features on the calibration images: ``tensors[k]`` ``(n, ...)`` per
    target (every block's output when ``blocks``, then the last hidden state), each target's
    squared error divided by ``scales[k]`` in the loss."""

    tensors: list[Tensor]
    scales: list[float]
    blocks: bool


def backbone_features(model: nn.Module, adapter: ModelAdapter, pixels: Tensor) -> Tensor:
    """The backbone's last hidden state ``(n, tokens, hidden)``, float32."""
    return adapter.run(model, pixels).last_hidden_state.float()


def model_features(
    model: nn.Module, adapter: ModelAdapter, pixels: Tensor, blocks: bool
) -> list[Tensor]:
    """The features :class:`Targets` holds, of ``model`` on ``pixels`` (float32): with
    ``blocks``, every block's output (forward hooks), then the last hidden state."""
    if not blocks:
        return [backbone_features(model, adapter, pixels)]
    taps: list[Tensor] = []

    def tap(_module, _args, out) -> None:
        taps.append((out[0] if isinstance(out, tuple) else out).float())

    handles = [block.register_forward_hook(tap) for block in adapter.block_list(model)]
    try:
        last = backbone_features(model, adapter, pixels)
    finally:
        for handle in handles:
            handle.remove()
    return [*taps, last]


def teacher_features(
    model: nn.Module, adapter: ModelAdapter, pixels: Tensor, batch_size: int, blocks: bool = False
) -> Targets:
    """:func:`model_features` of ``model`` on every image, in batches, without grad (call it
    before the model changes: the float model is the teacher). Block outputs are kept in
    float16 where they fit (half the memory: 4,096 DINOv2-S images take 2.5 GB)."""
    with torch.no_grad():
        parts = [
            model_features(model, adapter, pixels[i : i + batch_size], blocks)
            for i in range(0, pixels.shape[0], batch_size)
        ]
    tensors = [torch.cat(column) for column in zip(*parts, strict=True)]
    if not blocks:
        return Targets(tensors, [1.0], blocks=False)
    scales = [t.square().mean().item() or 1.0 for t in tensors]
    half = [t.half() for t in tensors[:-1]]
    if all(torch.isfinite(h).all() for h in half):
        tensors = [*half, tensors[-1]]
    return Targets(tensors, scales, blocks=True)


def feature_loss(outs: list[Tensor], targets: Targets, pick: Tensor | slice) -> Tensor:
    """The distillation loss of ``outs`` against ``targets`` at the images ``pick``."""
    terms = []
    for out, target, scale in zip(outs, targets.tensors, targets.scales, strict=True):
        at = pick if isinstance(pick, slice) else pick.to(target.device)
        terms.append((out - target[at].to(out.device, out.dtype)).square().mean() / scale)
    return sum(terms) / len(terms)


def distillation_loss(
    model: nn.Module, adapter: ModelAdapter, pixels: Tensor, targets: Targets, batch_size: int
) -> float:
    """:func:`feature_loss` over every image, without grad."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, pixels.shape[0], batch_size):
            part = pixels[i : i + batch_size]
            outs = model_features(model, adapter, part, targets.blocks)
            total += feature_loss(outs, targets, slice(i, i + batch_size)).item() * part.shape[0]
    return total / pixels.shape[0]


def distill(
    model: nn.Module,
    adapter: ModelAdapter,
    pixels: Tensor,
    targets: Targets,
    trained: list[Tensor],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    progress: bool = False,
) -> Reconstruction:
    """Train ``trained`` (every other parameter of ``model`` frozen) for ``steps`` so that the
    features on ``pixels`` approach ``targets`` (:func:`teacher_features`); the loss on every
    image before and after.
    Raises NonFiniteError if the loss becomes NaN/inf."""
    before = distillation_loss(model, adapter, pixels, targets, batch_size)
    if not steps:
        return Reconstruction(before, before)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(trained, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    with only_trainable(model, trained), loss_checked_training():
        for _ in tqdm(range(steps), desc="distil", disable=not progress, leave=False):
            pick = torch.randperm(pixels.shape[0], generator=generator)[:batch_size]
            outs = model_features(model, adapter, pixels[pick.to(pixels.device)], targets.blocks)
            loss = feature_loss(outs, targets, pick)
            if not torch.isfinite(loss):
                raise NonFiniteError("distillation diverged (NaN/inf loss); lower the lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return Reconstruction(before, distillation_loss(model, adapter, pixels, targets, batch_size))
