"""Moving a module's forward hooks to the module that replaces it (packing, the sparse MLP)."""

from __future__ import annotations

from torch import nn

from channelwise.quant.dual_grained import DUAL_GRAINED_ATTR
from channelwise.quant.grid import GRID_ATTR

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def move_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` ``old``'s forward hooks (input quantizer, online rotations) and the
    channelwise attributes that track them; the hooks' removal handles keep working."""
    for attr in _HOOK_DICTS:
        setattr(new, attr, getattr(old, attr))
    for attr, value in vars(old).items():
        if attr.startswith("_channelwise_") and attr not in (GRID_ATTR, DUAL_GRAINED_ATTR):
            setattr(new, attr, value)
