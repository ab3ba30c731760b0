"""Binarization for quantization-aware training: binary weights, sign activations and BiViT's
softmax-aware binarized attention.

He, Lou, Qian, Zhuang, Li, "BiViT: Extremely Compressed Binary Vision Transformers", ICCV 2023
(arXiv 2211.07091; code ``ThisisBillhe/BiViT``).

- Weights: ``W_b = α ⊙ sign(W − mean_row(W))``, ``α`` one learnable scale per output row
  (initialised to ``mean|W − mean_row(W)|``, the L1-optimal scale); the latent float weight is
  trained straight through the sign.
- Activations: ``sign(x)``, the gradient passed where ``|x| < 1`` and zeroed elsewhere (the
  clipped straight-through estimator).
- Attention probabilities: each row binarized to ``1[a ≥ β·max(a)]`` (softmax-aware: the
  threshold follows the row's own peak), the gradient passed straight through to the softmax.

``sign(0)`` is taken as +1 here, so every value is one of two levels (``torch.sign`` gives 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from channelwise.quant.core import _check_finite


def binary_sign(x: Tensor) -> Tensor:
    """``+1`` where ``x ≥ 0``, ``−1`` elsewhere (same dtype)."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def sign_straight_through(x: Tensor) -> Tensor:
    """:func:`binary_sign` in the forward pass; gradient 1 where ``|x| < 1``, 0 elsewhere."""
    _check_finite(x)
    inside = (x.abs() < 1).to(x.dtype)
    return binary_sign(x).detach() + (x - x.detach()) * inside


def binary_weight(weight: Tensor, alpha: Tensor) -> Tensor:
    """``alpha[:, None] · sign(W − mean_row(W))``; the gradient reaches ``weight`` unchanged
    (straight through) and ``alpha`` exactly."""
    centred = weight - weight.mean(dim=1, keepdim=True)
    signs = binary_sign(centred).detach() + (centred - centred.detach())
    return alpha.unsqueeze(1) * signs


def initial_alpha(weight: Tensor) -> Tensor:
    """``mean|W − mean_row(W)|`` per row: the scale minimising ``‖W − α·sign(W − μ)‖₁``-type
    error at the start of training."""
    return (weight - weight.mean(dim=1, keepdim=True)).abs().mean(dim=1)


class BinaryWeight(nn.Module):
    """A parametrization (``torch.nn.utils.parametrize``) making a linear compute with
    :func:`binary_weight` of its latent weight; ``alpha`` is a trained parameter."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.alpha = nn.Parameter(initial_alpha(weight.detach()))

    def forward(self, weight: Tensor) -> Tensor:
        return binary_weight(weight, self.alpha)


_SIGN_INPUT_ATTR = "_channelwise_sign_input"


def install_sign_input(module: nn.Module) -> None:
    """Binarize ``module``'s input with :func:`sign_straight_through` from now on (a forward
    pre-hook, once). Not an input *quantizer*: a checkpoint does not list it; the method that
    installed it re-installs it on load (``Method.restore``)."""
    if getattr(module, _SIGN_INPUT_ATTR, None) is None:
        hook = module.register_forward_pre_hook(
            lambda _module, args: (sign_straight_through(args[0]), *args[1:])
        )
        setattr(module, _SIGN_INPUT_ATTR, hook)


def has_sign_input(module: nn.Module) -> bool:
    return getattr(module, _SIGN_INPUT_ATTR, None) is not None


@dataclass
class SignQuantizer:
    """Attention-input entry (q, k or v): :func:`sign_straight_through`. Re-installed by its
    method on load, so a checkpoint does not store it (``restored_by_method``)."""

    calibrated: bool = True
    restored_by_method: ClassVar[bool] = True

    def __call__(self, x: Tensor) -> Tensor:
        return sign_straight_through(x)


@dataclass
class SoftmaxBinarizer:
    """Attention-probabilities entry: ``1[a ≥ β·max_row(a)]``, straight through to ``a``;
    re-installed by its method on load, like :class:`SignQuantizer`."""

    beta: float = 0.25
    calibrated: bool = True
    restored_by_method: ClassVar[bool] = True

    def __call__(self, probs: Tensor) -> Tensor:
        return binarize_softmax(probs, self.beta)


def binarize_softmax(probs: Tensor, beta: float) -> Tensor:
    """Each row of ``probs`` (last dim) to ``1[a ≥ β·max(a)]``; gradient straight through."""
    _check_finite(probs)
    peak = probs.detach().amax(dim=-1, keepdim=True)
    binary = (probs.detach() >= beta * peak).to(probs.dtype)
    return binary + (probs - probs.detach())
