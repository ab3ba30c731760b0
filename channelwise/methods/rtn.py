"""Round-to-nearest (RTN): the baseline every method is measured against.

Each linear's weight is quantized on its own with the recipe's weight quantizer (min-max range by
default; percentile or MSE clip search where the recipe asks), no calibration data needed.
"""

from __future__ import annotations

from channelwise.adapters import linear_weight
from channelwise.engine import BlockContext
from channelwise.methods.registry import Method, register
from channelwise.quant import fake_quantize


@register
class RTN(Method):
    name = "rtn"
    quantizes_weights = True

    def apply(self, ctx: BlockContext) -> None:
        spec = self.recipe.weights.spec("weight")
        for module in ctx.adapter.block_linears(ctx.block).values():
            weight = linear_weight(module, ctx.adapter.transposed_weights)
            weight.copy_(fake_quantize(weight, spec))
