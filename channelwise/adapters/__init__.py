"""Architecture adapters; importing this package registers every family."""

from channelwise.adapters import dinov2, gpt2, gpt_neox, llama, opt, vit  # noqa: F401 (registration)
from channelwise.adapters.base import (
    ModelAdapter,
    Subset,
    adapter_for,
    adapter_for_config,
    linear_weight,
    register_adapter,
    supported_model_types,
)

__all__ = [
    "ModelAdapter",
    "Subset",
    "adapter_for",
    "adapter_for_config",
    "linear_weight",
    "register_adapter",
    "supported_model_types",
]
