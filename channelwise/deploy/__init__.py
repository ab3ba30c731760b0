"""Deployment: packed integer checkpoints, the compiled decode loop, exporters."""

from channelwise.deploy.decode import compile_decode
from channelwise.deploy.packed import PackedLinear, pack_linear, pack_model

__all__ = ["PackedLinear", "compile_decode", "pack_linear", "pack_model"]
