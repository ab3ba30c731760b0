"""Block-output reconstruction: train a block's linear weights and biases (or other given
parameters, such as learnable activation clipping bounds) so that its output on given inputs
matches target outputs, through the block's quantizers.

The quantizers pass gradients straight through (``quant.core.straight_through``); their ranges
stay fixed unless they are among the trained parameters. With a weight quantizer, each linear's
weight is fake-quantized in the forward pass on a grid fixed before training (``weight_grids``),
the latent float weight is trained, and it is rounded onto that grid afterwards
(``quantize_weights_by_reconstruction``). This is the block-wise reconstruction of BRECQ-style
PTQ as I&S-ViT (arXiv 2311.10126, §4.2) uses it: Adam with a cosine learning rate decaying to 0,
random mini-batches of the calibration samples, and the loss ``(out − target)²`` summed over the
tokens and averaged over samples and channels (the official code's ``lp_loss``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from channelwise.adapters import linear_weight
from channelwise.engine import BlockContext, hidden_state
from channelwise.errors import NonFiniteError
from channelwise.quant.core import (
    QParams,
    QuantSpec,
    compute_qparams,
    fake_quantize,
    loss_checked_training,
)
from channelwise.quant.grid import round_weight_


@dataclass(frozen=True)
class Reconstruction:
    """Loss on all samples before and after training (same inputs, targets and quantizers)."""

    loss_before: float
    loss_after: float


@contextmanager
def only_trainable(module: nn.Module, params: list[Tensor]) -> Iterator[None]:
    """Inside, grad mode is on and of ``module``'s parameters (and ``params``) only ``params``
    require grad; on exit every flag is as it was."""
    flags = {p: p.requires_grad for p in [*module.parameters(), *params]}
    for param in module.parameters():
        param.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for param, flag in flags.items():
            param.requires_grad_(flag)


def block_kwargs(ctx: BlockContext) -> dict:
    """The keyword arguments of the block's forward (a vision block's do not vary per batch)."""
    return ctx.kwargs[0] if ctx.kwargs else {}


def reconstruction_loss(out: Tensor, target: Tensor) -> Tensor:
    """``(out − target)²`` summed over dimension 1 (the tokens), averaged over the rest."""
    return (out - target).square().sum(1).mean()


def block_loss(
    block: nn.Module, inputs: Tensor, kwargs: dict, targets: Tensor, batch_size: int
) -> float:
    """:func:`reconstruction_loss` of ``block`` over all samples, in batches, without grad."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch_size):
            out = hidden_state(block(inputs[start : start + batch_size], **kwargs))
            part = targets[start : start + batch_size]
            total += reconstruction_loss(out, part).item() * part.shape[0]
    return total / inputs.shape[0]


def linear_parameters(linears: list[nn.Module]) -> list[Tensor]:
    """The weights and biases of ``linears`` (what a reconstruction trains by default)."""
    return [p for module in linears for p in module.parameters() if p is not None]


def reconstruct_block(
    block: nn.Module,
    trained: list[Tensor],
    inputs: Tensor,
    kwargs: dict,
    targets: Tensor,
    *,
    iters: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    progress: bool = False,
) -> Reconstruction:
    """Train the tensors ``trained`` (e.g. :func:`linear_parameters`; every other parameter of
    ``block`` frozen) so that ``block(inputs, **kwargs)`` approaches ``targets`` (both
    ``(n, tokens, hidden)``).

    ``kwargs`` must not depend on the batch (a vision block's: none). Raises NonFiniteError if
    the loss becomes NaN/inf.
    """
    before = block_loss(block, inputs, kwargs, targets, batch_size)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(trained, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iters, eta_min=0.0)
    with only_trainable(block, trained), loss_checked_training():
        steps = tqdm(range(iters), desc="reconstruct", disable=not progress, leave=False)
        for _ in steps:
            pick = torch.randperm(inputs.shape[0], generator=generator)[:batch_size]
            pick = pick.to(inputs.device)
            out = hidden_state(block(inputs[pick], **kwargs))
            loss = reconstruction_loss(out, targets[pick])
            if not torch.isfinite(loss):
                raise NonFiniteError(
                    "block reconstruction diverged (NaN/inf loss); lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return Reconstruction(before, block_loss(block, inputs, kwargs, targets, batch_size))


def quantize_weights_by_reconstruction(
    block: nn.Module,
    linears: list[nn.Module],
    inputs: Tensor,
    kwargs: dict,
    targets: Tensor,
    spec: QuantSpec,
    *,
    iters: int,
    **settings,
) -> Reconstruction | None:
    """Fix each linear's grid of ``spec`` on its current weight, train the latent float weights
    and biases through the fake-quantized weights for ``iters`` (:func:`reconstruct_block`
    with ``settings``; 0: no training, ``None`` returned), then round every weight onto its grid
    (recorded for packing). The weight stage of I&S-ViT and RepQuant."""
    grids = [compute_qparams(module.weight.detach(), spec) for module in linears]
    result = None
    if iters:
        with weight_grids(linears, spec, grids):
            result = reconstruct_block(
                block, linear_parameters(linears), inputs, kwargs, targets, iters=iters,
                **settings,
            )  # fmt: skip
    with torch.no_grad():
        for module, grid in zip(linears, grids, strict=True):
            round_weight_(module, linear_weight(module, False), spec, grid)
    return result


class FloatStream:
    """The float model's inputs to the current block, carried block to block beside the
    compressed model's own (``ctx.inputs``): the targets of a block's reconstruction are the
    float block's outputs on float inputs. Call :meth:`step` once per block, before the block
    changes."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self._inputs: Tensor | None = None

    def step(self, ctx: BlockContext) -> tuple[Tensor, Tensor]:
        """``(float inputs, float outputs)`` of ``ctx.block``, each ``(n, tokens, hidden)`` on
        the block's device; the outputs become the next block's float inputs."""
        if ctx.index == 0 or self._inputs is None:  # block 0: nothing before it is compressed
            self._inputs = stacked_inputs(ctx)
        inputs = self._inputs.to(ctx.device)
        kwargs = block_kwargs(ctx)
        with torch.no_grad():
            outputs = torch.cat([
                hidden_state(ctx.block(inputs[i : i + self.batch_size], **kwargs))
                for i in range(0, inputs.shape[0], self.batch_size)
            ])  # fmt: skip
        following = None if ctx.last else ctx.to_next_block(outputs, kwargs)
        self._inputs = None if following is None else following.to(ctx.inputs[0].device)
        return inputs, outputs


def stacked_inputs(ctx: BlockContext) -> Tensor:
    """The block's calibration inputs as one ``(n, tokens, hidden)`` tensor on its device."""
    return torch.cat([x.to(ctx.device) for x in ctx.inputs])


class _WeightFunction(nn.Module):
    def __init__(self, function) -> None:
        super().__init__()
        self.function = function

    def forward(self, weight: Tensor) -> Tensor:
        return self.function(weight)


@contextmanager
def weight_functions(linears: list[nn.Module], functions: list) -> Iterator[None]:
    """Inside, each ``nn.Linear`` computes with ``function(weight)`` in place of its weight (the
    float weight still the trained parameter, gradients through the function); on exit the
    float weights are back."""
    for module, function in zip(linears, functions, strict=True):
        parametrize.register_parametrization(module, "weight", _WeightFunction(function))
    try:
        yield
    finally:
        for module in linears:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


def weight_grids(
    linears: list[nn.Module], spec: QuantSpec, qparams: list[QParams]
) -> AbstractContextManager[None]:
    """:func:`weight_functions` fake-quantizing each weight on its fixed grid (straight-through
    gradients)."""
    return weight_functions(
        linears, [partial(fake_quantize, spec=spec, qparams=grid) for grid in qparams]
    )


def weight_masks(linears: list[nn.Module], masks: list[Tensor]) -> AbstractContextManager[None]:
    """:func:`weight_functions` multiplying each weight by its 0/1 ``mask`` (pruned entries stay
    zero and get no gradient)."""
    return weight_functions(
        linears, [partial(torch.mul, other=mask.to(m.weight.dtype)) for m, mask in
                  zip(linears, masks, strict=True)]
    )  # fmt: skip
