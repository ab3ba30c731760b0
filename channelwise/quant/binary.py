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


class SignInput:
    """Forward pre-hook binarizing a linear's input with :func:`sign_straight_through`."""

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (sign_straight_through(args[0]), *args[1:])

    def __repr__(self) -> str:
        return "SignInput()"


@dataclass
class SignQuantizer:
    """Attention-input entry (q, k or v): :func:`sign_straight_through`."""

    calibrated: bool = True

    def __call__(self, x: Tensor) -> Tensor:
        return sign_straight_through(x)

    def describe(self) -> dict:
        return {"kind": "sign"}

    def tensors(self) -> dict[str, Tensor]:
        return {}


@dataclass
class SoftmaxBinarizer:
    """Attention-probabilities entry: ``1[a ≥ β·max_row(a)]``, straight through to ``a``."""

    beta: float = 0.25
    calibrated: bool = True

    def __call__(self, probs: Tensor) -> Tensor:
        return binarize_softmax(probs, self.beta)

    def describe(self) -> dict:
        return {"kind": "binary_softmax", "beta": self.beta}

    def tensors(self) -> dict[str, Tensor]:
        return {}


def binarize_softmax(probs: Tensor, beta: float) -> Tensor:
    """Each row of ``probs`` (last dim) to ``1[a ≥ β·max(a)]``; gradient straight through."""
    _check_finite(probs)
    peak = probs.detach().amax(dim=-1, keepdim=True)
    binary = (probs.detach() >= beta * peak).to(probs.dtype)
    return binary + (probs - probs.detach())
