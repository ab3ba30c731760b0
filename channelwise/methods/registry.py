"""The method registry: a recipe step names a method, the registry builds it.

A method works on one block at a time through a :class:`~channelwise.engine.BlockContext`. It
declares whether it needs calibration activations (``needs_calibration``) and whether it leaves
the weights quantized (``quantizes_weights``); its step arguments are a pydantic model
(``Args``), validated when the recipe is planned.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from channelwise.engine import BlockContext
from channelwise.errors import RecipeError
from channelwise.recipe import Recipe, Step


class NoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Method:
    """Base class of every registered method."""

    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = False
    quantizes_weights: ClassVar[bool] = False
    #: Whether the method calibrates across processes (:mod:`channelwise.distributed`): it
    #: reduces what it observes over ``ctx.group`` and quantizes each linear once.
    distributed: ClassVar[bool] = False
    #: Whether the method runs on a model whose blocks wait on disk (:mod:`channelwise.offload`):
    #: it changes a block only while the engine holds that block (no whole-model work).
    offloadable: ClassVar[bool] = False
    #: Whether ``apply`` also works on a transition between blocks (Swin's patch merging: a
    #: LayerNorm → linear subset and no attention, ``ctx.adapter`` its transition adapter).
    handles_transitions: ClassVar[bool] = False
    Args: ClassVar[type[BaseModel]] = NoArgs

    def __init__(self, recipe: Recipe, args: BaseModel) -> None:
        self.recipe = recipe
        self.args = args

    def check(self, model, adapter) -> None:
        """Raise a RecipeError before any work if the model cannot honour this step.

        A method that quantizes weights needs the recipe's ``weights`` quantizer.
        """
        if self.quantizes_weights and self.recipe.weights is None:
            raise RecipeError(
                f"recipe '{self.recipe.name}': step '{self.name}' needs a 'weights' quantizer "
                "(e.g. weights: {bits: 4, symmetric: false, granularity: group, group_size: 64})"
            )

    def prepare_model(
        self, model: nn.Module, adapter, calibration: Tensor | None, *, progress: bool = False
    ) -> None:
        """Whole-model work, once, after every step's ``check`` and before the block loop.

        Steps run it in recipe order (e.g. rotating the embeddings and the LM head, or a global
        hyper-parameter search on ``calibration`` token ids ``(n, seq)``); ``progress``: whether
        long work may show its own progress bar. Default: nothing.
        """

    def apply(self, ctx: BlockContext) -> None:
        raise NotImplementedError

    def bits_label(self) -> str | None:
        """A label of what this step leaves quantized, where the recipe's quantizers do not say
        it (a method that binarizes by itself). Default: None (the recipe's label)."""
        return None

    def weight_bits(self, model: nn.Module, adapter) -> float | None:
        """Bits per block-linear weight this step leaves, where the recipe's ``weights`` does
        not say it. Default: None."""
        return None

    def saved_state(self) -> dict[str, Tensor]:
        """Tensors a saved checkpoint needs to re-install this step's runtime ops (hooks that
        are not weights, e.g. an online Hadamard). Default: none."""
        return {}

    def restore(self, model: nn.Module, adapter, state: dict[str, Tensor]) -> None:
        """Re-install runtime ops on a loaded model whose weights already carry this step.

        Called after ``check`` and before the activation quantizers are installed. Default:
        nothing.
        """


_METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    _METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_METHODS)


def method_classes() -> dict[str, type[Method]]:
    """Every registered method's class, by name."""
    return dict(_METHODS)


def validated_args(model: type[BaseModel], args: dict, where: str) -> BaseModel:
    """``args`` validated by the pydantic ``model``; problems as one RecipeError naming
    ``where`` (e.g. "recipe 'x', step 'gptq'") and every offending field."""
    try:
        return model.model_validate(args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise RecipeError(f"{where}: {problems}") from None


def build_method(step: Step, recipe: Recipe) -> Method:
    if step.method not in _METHODS:
        raise RecipeError(
            f"recipe '{recipe.name}': unknown method '{step.method}'; "
            f"registered methods: {', '.join(method_names())}"
        )
    cls = _METHODS[step.method]
    where = f"recipe '{recipe.name}', step '{step.method}'"
    return cls(recipe, validated_args(cls.Args, step.args, where))


def quantizes_weights(method: str) -> bool:
    """Whether the registered method ``method`` leaves the weights quantized."""
    cls = _METHODS.get(method)
    return cls is not None and cls.quantizes_weights


def quantizes_transitions(recipe: Recipe) -> bool:
    """Whether the modules between blocks (Swin's patch merging) are quantized too: when the
    recipe quantizes weights or activations and every step handles transitions (RTN,
    RepQ-ViT, I&S-ViT, RepQuant, LRP-QViT); else they stay in float."""
    quantizes = recipe.weights is not None or recipe.activations is not None
    handled = [getattr(_METHODS.get(s.method), "handles_transitions", False) for s in recipe.steps]
    return quantizes and all(handled)


def check_transform_order(
    recipe: Recipe, name: str, what: str = "", needs_quantizer_after: bool = False
) -> None:
    """Refuse step ``name`` after a weight-quantizing step (its transform would be lost on the
    quantized weights); with ``needs_quantizer_after``, also refuse it with no quantizing step
    after it (a pure transform that leaves the weights in float). ``what`` names the transform
    in the message (e.g. "the rotation"); default: "step '<name>'"."""
    steps = [step.method for step in recipe.steps]
    where = f"recipe '{recipe.name}', step '{name}'"
    what = what or f"step '{name}'"
    for index, method in enumerate(steps):
        if method != name:
            continue
        before = [m for m in steps[:index] if quantizes_weights(m)]
        if before:
            raise RecipeError(
                f"{where}: {what} must come before weight quantization, but step "
                f"'{before[0]}' quantizes the weights first; put {name} first"
            )
        if needs_quantizer_after and not any(quantizes_weights(m) for m in steps[index + 1 :]):
            raise RecipeError(
                f"{where}: {name} quantizes no weights; follow it with a quantizing step "
                f"(steps: [{{method: {name}}}, {{method: gptq}}] or rtn)"
            )


def check_search_transform(recipe: Recipe, name: str) -> None:
    """A step whose search scores the recipe's weight quantizer: it needs ``weights`` and a
    quantizing step after it (and none before)."""
    if recipe.weights is None:
        raise RecipeError(
            f"recipe '{recipe.name}', step '{name}': the search needs the recipe's 'weights' "
            "quantizer (e.g. weights: {bits: 4, symmetric: false, granularity: group, "
            "group_size: 64})"
        )
    check_transform_order(recipe, name, needs_quantizer_after=True)
