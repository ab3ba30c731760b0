"""Deployment: packed integer checkpoints, the compiled decode loop, exporters."""

from channelwise.deploy.decode import Generation, compile_decode, generate_text
from channelwise.deploy.packed import PackedLinear, pack_linear, pack_model

__all__ = [
    "Generation",
    "PackedLinear",
    "compile_decode",
    "generate_text",
    "pack_linear",
    "pack_model",
]
