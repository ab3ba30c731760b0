"""Round-to-nearest (RTN): the baseline every method is measured against.

Each linear's weight is quantized on its own with the recipe's weight quantizer (min-max range by
default; percentile or MSE clip search where the recipe asks), no calibration data needed.
"""

from __future__ import annotations

from torch import nn

from channelwise.adapters import ModelAdapter, linear_weight
from channelwise.engine import BlockContext
from channelwise.methods.registry import Method, register
from channelwise.quant import QuantSpec
from channelwise.quant.grid import round_weight_


def rtn_block(block: nn.Module, adapter: ModelAdapter, spec: QuantSpec) -> None:
    """Round every linear of ``block`` to ``spec``'s grid, in place."""
    for module in adapter.block_linears(block).values():
        round_weight_(module, linear_weight(module, adapter.transposed_weights), spec)


@register
class RTN(Method):
    name = "rtn"
    quantizes_weights = True
    handles_transitions = True
    distributed = True
    offloadable = True

    def apply(self, ctx: BlockContext) -> None:
        rtn_block(ctx.block, ctx.adapter, self.recipe.weights.spec("weight"))
