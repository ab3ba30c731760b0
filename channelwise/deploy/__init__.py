"""Deployment: packed integer checkpoints (and, later, kernels and exporters)."""

from channelwise.deploy.packed import PackedLinear, pack_linear, pack_model

__all__ = ["PackedLinear", "pack_linear", "pack_model"]
