"""Architecture adapters; importing this package registers every family."""

from channelwise.adapters import (  # noqa: F401 (registration)
    dinov2,
    gemma,
    gpt2,
    gpt_neox,
    llama,
    mixtral,
    opt,
    phi3,
    swin,
    vit,
)
from channelwise.adapters.base import (
    ModelAdapter,
    Subset,
    adapter_for,
    adapter_for_config,
    add_column_readers,
    column_readers,
    linear_weight,
    norm_gain,
    parts_by_name,
    register_adapter,
    set_norm_gain,
    supported_model_types,
)

__all__ = [
    "ModelAdapter",
    "Subset",
    "add_column_readers",
    "adapter_for",
    "adapter_for_config",
    "column_readers",
    "linear_weight",
    "norm_gain",
    "parts_by_name",
    "set_norm_gain",
    "register_adapter",
    "supported_model_types",
]
