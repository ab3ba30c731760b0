"""Whole-model feature distillation of a Vision Transformer backbone: train chosen parameters of
the compressed model so that its last hidden state approaches the float model's on the
calibration images.

Quantization-aware training (BiViT) and fine-tuning after pruning (LPViT) both train the whole
network end to end, where block reconstruction (:mod:`channelwise.reconstruct`) trains one block
at a time. The papers distil a classifier's logits on ImageNet with labels; a headless backbone
has no logits, and its linear probe is fitted on (and frozen over) its last hidden state, so the
loss here is the mean squared error of that state against the float model's. Adam with a cosine
learning rate decaying to 0, random mini-batches of the calibration images.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from channelwise.adapters import ModelAdapter
from channelwise.errors import NonFiniteError
from channelwise.quant.core import loss_checked_training
from channelwise.reconstruct import Reconstruction, only_trainable


def backbone_features(model: nn.Module, adapter: ModelAdapter, pixels: Tensor) -> Tensor:
    """The backbone's last hidden state ``(n, tokens, hidden)``, float32."""
    return adapter.run(model, pixels).last_hidden_state.float()


def teacher_features(
    model: nn.Module, adapter: ModelAdapter, pixels: Tensor, batch_size: int
) -> Tensor:
    """:func:`backbone_features` of ``model`` on every image, in batches, without grad (call it
    before the model changes: the float model is the teacher)."""
    with torch.no_grad():
        return torch.cat([
            backbone_features(model, adapter, pixels[i : i + batch_size])
            for i in range(0, pixels.shape[0], batch_size)
        ])  # fmt: skip


def distillation_loss(
    model: nn.Module, adapter: ModelAdapter, pixels: Tensor, targets: Tensor, batch_size: int
) -> float:
    """Mean squared error of the features to ``targets`` over every image, without grad."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, pixels.shape[0], batch_size):
            out = backbone_features(model, adapter, pixels[i : i + batch_size])
            part = targets[i : i + batch_size]
            total += (out - part).square().mean().item() * part.shape[0]
    return total / pixels.shape[0]


def distill(
    model: nn.Module,
    adapter: ModelAdapter,
    pixels: Tensor,
    targets: Tensor,
    trained: list[Tensor],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    progress: bool = False,
) -> Reconstruction:
    """Train ``trained`` (every other parameter of ``model`` frozen) for ``steps`` so that the
    features on ``pixels`` approach ``targets``; the loss on every image before and after.
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
            out = backbone_features(model, adapter, pixels[pick.to(pixels.device)])
            loss = (out - targets[pick.to(targets.device)]).square().mean()
            if not torch.isfinite(loss):
                raise NonFiniteError("distillation diverged (NaN/inf loss); lower the lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return Reconstruction(before, distillation_loss(model, adapter, pixels, targets, batch_size))
