"""Refusals every exporter shares: a compressed model, packed linears, no runtime-only ops."""

from __future__ import annotations

from torch import nn

from channelwise.deploy.packed_modules import PackedLinear
from channelwise.errors import ExportError
from channelwise.state import METHODS_ATTR, RECIPE_ATTR


def exported_recipe(model: nn.Module):
    """The recipe ``model`` was compressed with, or :class:`ExportError`."""
    recipe = getattr(model, RECIPE_ATTR, None)
    if recipe is None:
        raise ExportError("the model was not compressed by channelwise.quantize; nothing to export")
    return recipe


def packed_linears(model: nn.Module, recipe) -> dict[str, PackedLinear]:
    """``{name: PackedLinear}`` of ``model``; none is an :class:`ExportError`."""
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    if not packed:
        raise ExportError(
            f"recipe '{recipe.name}': the model holds no packed linears; run "
            "channelwise.deploy.pack_model(model) first (a recipe without weight quantization "
            "has nothing to export)"
        )
    return packed


def refuse_online_steps(model: nn.Module, recipe, fmt: str, example: str) -> None:
    """:class:`ExportError` if a step needs an op at run time (state saved beside the weights:
    ``example`` names typical ones) that the format ``fmt`` cannot express."""
    for step, method in zip(recipe.steps, getattr(model, METHODS_ATTR, None) or (), strict=False):
        if method.saved_state():
            raise ExportError(
                f"step '{step.method}' of recipe '{recipe.name}' needs an online op at runtime "
                f"(e.g. {example}); {fmt} cannot express it, so the export would compute a "
                "different model"
            )
