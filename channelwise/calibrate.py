"""Calibrating one block's activation quantizers: the inputs of its linears and its attention.

``quantize_block_activations`` is what ``compress.quantize`` runs on each block after the
recipe's steps; a method that needs the block's quantizers in place while it works (I&S-ViT's
block reconstruction) runs it itself, and the block loop then leaves those quantizers alone.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from channelwise.engine import BlockContext
from channelwise.quant import static_qparams
from channelwise.quant.activation import InputQuantizer, input_quantizer, install_input_quantizer
from channelwise.quant.attention import (
    AttentionQuantizers,
    attention_quantizers,
    calibrate_attention_quantizers,
    install_attention_quantizers,
)
from channelwise.quant.granularity import PerColumn
from channelwise.recipe import Recipe


def quantize_block_activations(
    model: nn.Module, ctx: BlockContext, recipe: Recipe, per_channel: tuple[str, ...] = ()
) -> None:
    """Install the recipe's input quantizers on the block's linears and its attention quantizers.

    Dynamic attention (every LLM preset): the linears, then the attention. Static attention
    ranges are calibrated in execution order, each on quantized inputs: the attention's input
    linears, then q/k/v and the probabilities, then the other linears. Quantizers a method
    already installed stay; the linears named in ``per_channel`` get static per-channel ranges
    (the recipe's per-tensor spec run per input channel).
    """
    attention = ctx.block.get_submodule(ctx.adapter.attention_module)
    quant = recipe.attention.specs() if recipe.attention is not None else None
    own = attention_quantizers(attention)  # a method's (RepQ-ViT's log√2 softmax)
    static = (quant or AttentionQuantizers()).merged_over(own).static()
    if not static:
        if recipe.activations is not None:
            install_block_input_quantizers(ctx, recipe, per_channel=per_channel)
        if quant is not None:
            install_attention_quantizers(model, [attention], quant)
        return
    if recipe.activations is not None:
        first = ctx.adapter.subsets[0].linears
        install_block_input_quantizers(ctx, recipe, first, per_channel=per_channel)
    if quant is not None:
        install_attention_quantizers(model, [attention], quant)
    calibrate_attention_quantizers(attention, ctx.forward)
    if recipe.activations is not None:
        install_block_input_quantizers(ctx, recipe, per_channel=per_channel)


INPUT_BITS_ATTR = "_channelwise_input_bits"


def set_input_bits(module: nn.Module, bits: int) -> None:
    """Quantize ``module``'s input to ``bits`` instead of the recipe's activation bits (a
    mixed-precision method's per-layer choice; the rest of the recipe's spec stays)."""
    setattr(module, INPUT_BITS_ATTR, bits)


def install_block_input_quantizers(
    ctx: BlockContext,
    recipe: Recipe,
    only: tuple[str, ...] | None = None,
    per_channel: tuple[str, ...] = (),
) -> None:
    """Quantize every linear input of the block (or the linears named in ``only``): dynamic
    per call, or static from calibration (per channel for the linears in ``per_channel``).

    Linears that a method already gave an input quantizer of its own keep it; a linear given
    its own bits (:func:`set_input_bits`) gets the recipe's spec at those bits.
    """
    spec = recipe.activations.spec("activation")
    linears = {
        name: module
        for name, module in ctx.adapter.block_linears(ctx.block).items()
        if input_quantizer(module) is None and (only is None or name in only)
    }
    if not linears:
        return
    specs = {
        name: replace(spec, bits=getattr(module, INPUT_BITS_ATTR, spec.bits))
        for name, module in linears.items()
    }
    if recipe.activations.dynamic:
        for name, module in linears.items():
            install_input_quantizer(module, InputQuantizer(specs[name]))
        return
    with ctx.capture_inputs(tuple(linears)) as captured:
        ctx.forward()
    for name, module in linears.items():
        batches = [x.reshape(-1, x.shape[-1]) for x in captured[name]]
        if ctx.group is not None:  # every process's rows, in one process's order
            batches = ctx.group.gather_batches(batches)
        rows = torch.cat(batches)
        own = replace(specs[name], granularity=PerColumn()) if name in per_channel else specs[name]
        install_input_quantizer(module, InputQuantizer(own, static_qparams(rows, own)))
