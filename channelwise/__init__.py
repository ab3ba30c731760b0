"""channelwise: channel-wise compression of transformer models, with the quality cost measured.

import channelwise as cw
model, tokenizer = cw.load_model()                     # embedded SmolLM2-135M-Instruct
protocol = cw.Protocol()                               # calibrate on Emma, eval Pride & Prejudice
cw.quantize(model, "rtn-w8a8", protocol.calibration_tokens(tokenizer))
print(cw.perplexity(model, protocol.eval_tokens(tokenizer)))
"""

from channelwise.adapters import adapter_for
from channelwise.compress import CompressionResult, quantize, save_quantized
from channelwise.errors import ChannelwiseError
from channelwise.evaluate import perplexity
from channelwise.kvcache import chunked_perplexity, make_cache
from channelwise.models import DEFAULT_MODEL, load_model
from channelwise.offload import load_offloaded
from channelwise.protocol import Protocol
from channelwise.recipe import QuantArgs, Recipe, Step, load_recipe, preset_names

__all__ = [
    "DEFAULT_MODEL",
    "ChannelwiseError",
    "CompressionResult",
    "Protocol",
    "QuantArgs",
    "Recipe",
    "Step",
    "adapter_for",
    "chunked_perplexity",
    "load_model",
    "load_offloaded",
    "load_recipe",
    "make_cache",
    "perplexity",
    "preset_names",
    "quantize",
    "save_quantized",
]
