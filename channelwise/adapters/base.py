"""Model adapters: declarations of where things live in each architecture family.

An adapter names the decoder blocks, and inside a block the *subsets*: which op (a norm, or a
linear) produces the input of which linears. Channel-wise methods read these declarations instead
of walking the model's code; supporting a new family is one small file (see ``llama.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from channelwise.errors import UnsupportedModelError


@dataclass(frozen=True)
class Subset:
    """Linears that read the same input, and the op that produces it.

    ``prev`` is the module (path relative to the block) whose output is the linears' input, or
    ``None`` when no single op does (e.g. the MLP's down projection reads act(gate)·up).
    ``prev_kind`` says what a channel transform can fold into: ``"norm"``, ``"linear"`` (one
    output channel of ``prev`` per input channel), or ``"grouped_heads"`` (v_proj → o_proj under
    grouped-query attention: one v channel per KV head feeds all query heads of its group).
    """

    name: str
    linears: tuple[str, ...]
    prev: str | None = None
    prev_kind: str | None = None

    @property
    def role(self) -> str:
        """The name without a per-expert suffix: a mixture's ``mlp_out.3`` plays ``mlp_out``."""
        return self.name.split(".")[0]


@dataclass(frozen=True)
class ModelAdapter:
    """Where a family keeps its blocks, norms, attention projections and MLP."""

    family: str
    blocks: str
    subsets: tuple[Subset, ...]
    embeddings: tuple[str, ...]
    final_norm: str | None
    lm_head: str | None
    norm_type: str
    attention: dict[str, str] = field(default_factory=dict)
    attention_module: str = "self_attn"
    transposed_weights: bool = False
    folding_unsupported: str | None = None
    #: Why a norm's output cannot be shifted (OS+/OutlierTune): a reader of the norm that is not
    #: quantized and has no bias to absorb the shift (Mixtral's router).
    shift_unsupported: str | None = None
    #: ``"text"`` (token ids in, ``model(ids)``) or ``"vision"`` (``model(pixel_values=…)``).
    modality: str = "text"
    #: Keyword arguments the model class is built with (e.g. no pooler for a ViT backbone).
    build_kwargs: dict = field(default_factory=dict)
    #: The activation of a gated MLP, ``act(gate)·up`` (e.g. ``mlp.act_fn``); None for a plain
    #: MLP (OPT, GPT-2, GPT-NeoX, ViTs).
    mlp_act: str | None = None
    #: Why the residual stream cannot be rotated (QuaRot's ``W ← W·Q``) though the norms are
    #: RMSNorms, e.g. Gemma's post-norms between the residual writers and the stream.
    rotation_unsupported: str | None = None
    #: Why the K/V-side channel methods (key sorting, per-channel key transforms, low-rank keys)
    #: do not fit, e.g. a norm on each head's queries and keys (Qwen3, Gemma 3).
    kv_transforms_unsupported: str | None = None
    #: A structural change made once before anything reads the blocks (exact in float; the
    #: state-dict layout of a float model is kept), e.g. Phi-3's fused projections split.
    prepare: Callable[[nn.Module], None] | None = None
    #: ``(regex, replacement)`` pairs renaming the tensors of a checkpoint as the family saves
    #: them (transformers' legacy names, e.g. Mixtral's ``block_sparse_moe.experts.N.w1``) to
    #: the names of this model's parameters after ``prepare``; what offloading reads a block
    #: with, where transformers' own loader converts the names (and merges Mixtral's experts).
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    #: The blocks' own paths, in execution order, where they do not sit in one list at
    #: ``blocks`` (Swin's stages: ``encoder.layers.S.blocks.J``); empty: ``blocks.0``, ``blocks.1``…
    block_paths: tuple[str, ...] = ()
    #: Modules that run between blocks, outside them: ``(index of the block they follow,
    #: module path)`` (Swin's patch merging after a stage's last block; see
    #: :meth:`to_next_block`); the linears and norms a recipe may quantize in them are named by
    #: ``transition_subsets`` relative to that module (see :meth:`transition_adapter`).
    transitions: tuple[tuple[int, str], ...] = ()
    transition_subsets: tuple[Subset, ...] = ()
    #: Whether a vision backbone's first token is a class token (ViT, DINOv2) or every token is
    #: a patch (Swin): what the image features are pooled from.
    class_token: bool = True
    #: The input size a vision model's architecture fixes (ViT/DeiT position embeddings, Swin
    #: windows: ``config.image_size``), used where the user gives none; None: the protocol's
    #: default (DINOv2 interpolates its position embeddings to any size).
    native_resolution: int | None = None
    #: Keyword arguments every forward of the model gets (ViT/DeiT: interpolate the position
    #: embeddings to the image size).
    forward_kwargs: dict = field(default_factory=dict)
    #: Raises a clear error for an image size ``(height, width)`` in pixels the model cannot
    #: take (Swin: a stage narrower than its attention window); None: any size.
    check_image: Callable[[int, int], None] | None = None

    def renamed(self, paths: dict[str, str]) -> ModelAdapter:
        """This adapter with module paths inside a block replaced (``old → new``)."""

        def rename(path: str | None) -> str | None:
            return paths.get(path, path)

        subsets = tuple(
            replace(s, linears=tuple(rename(n) for n in s.linears), prev=rename(s.prev))
            for s in self.subsets
        )
        attention = {key: rename(path) for key, path in self.attention.items()}
        return replace(self, subsets=subsets, attention=attention)

    def run(self, model: nn.Module, batch: torch.Tensor):
        """One forward of ``model`` on a calibration batch (token ids, or pixel values)."""
        if self.modality == "vision":
            return model(pixel_values=batch, **self.forward_kwargs)
        return model(batch, use_cache=False)

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        if self.block_paths:
            return nn.ModuleList(model.get_submodule(path) for path in self.block_paths)
        return model.get_submodule(self.blocks)

    def to_next_block(
        self, model: nn.Module, index: int, hidden: torch.Tensor, kwargs: dict
    ) -> torch.Tensor:
        """The next block's input given block ``index``'s output ``hidden`` on a batch it ran
        with ``kwargs``: ``hidden``, or the transition after that block run on it (with the
        keyword arguments its ``forward`` takes)."""
        path = dict(self.transitions).get(index)
        if path is None:
            return hidden
        module = model.get_submodule(path)
        device = next(module.parameters()).device
        with torch.no_grad():
            return module(hidden.to(device), **transition_kwargs(module, kwargs))

    def transition_adapter(self) -> ModelAdapter:
        """This adapter for a transition module in place of a block: its subsets, no attention
        (what a step that handles transitions, RTN or RepQ-ViT, reads as ``ctx.adapter``)."""
        return replace(
            self, subsets=self.transition_subsets, attention={}, transitions=(), block_paths=()
        )

    def block_path(self, index: int) -> str:
        """Block ``index``'s module path in the model (what its tensors' names start with)."""
        return self.block_paths[index] if self.block_paths else f"{self.blocks}.{index}"

    def linear_names(self) -> tuple[str, ...]:
        """Every quantizable linear of a block, in execution order."""
        return tuple(name for subset in self.subsets for name in subset.linears)

    def block_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        return {name: block.get_submodule(name) for name in self.linear_names()}

    def require_kv_transforms(self, what: str) -> None:
        """Refuse a transform of k_proj's output channels where the adapter says it misfits."""
        if self.kv_transforms_unsupported:
            raise UnsupportedModelError(
                f"{what} cannot be applied to {self.family}: {self.kv_transforms_unsupported}"
            )

    def require_folding(self, what: str) -> None:
        """Refuse a transform that folds into norms when the architecture makes it inexact."""
        if self.folding_unsupported:
            raise UnsupportedModelError(f"{what} cannot be applied: {self.folding_unsupported}")

    def require_shifting(self, what: str) -> None:
        """Refuse a transform that shifts a norm's output when a reader cannot absorb it."""
        self.require_folding(what)
        if self.shift_unsupported:
            raise UnsupportedModelError(f"{what} cannot be applied: {self.shift_unsupported}")


def transition_kwargs(module: nn.Module, kwargs: dict) -> dict:
    """The block keyword arguments a transition ``module``'s ``forward`` takes (Swin's patch
    merging: ``input_dimensions``)."""
    accepted = inspect.signature(module.forward).parameters
    return {k: v for k, v in kwargs.items() if k in accepted}


_COLUMN_READERS_ATTR = "_channelwise_column_readers"


def add_column_readers(norm: nn.Module, readers: list[nn.Module]) -> None:
    """Declare modules with an ``(out, in)`` ``weight`` that read ``norm``'s output but are
    neither quantized nor observed (a mixture's router). Every channel transform folded into
    ``norm`` (scales, fused gains, a residual rotation) is applied to their columns too, so it
    stays exact. A family's ``prepare`` declares them; repeated calls add no duplicate."""
    known = getattr(norm, _COLUMN_READERS_ATTR, [])
    setattr(
        norm, _COLUMN_READERS_ATTR, known + [r for r in readers if all(r is not k for k in known)]
    )


def column_readers(norm: nn.Module) -> list[nn.Module]:
    """The column-only readers declared for ``norm`` (see :func:`add_column_readers`)."""
    return list(getattr(norm, _COLUMN_READERS_ATTR, []))


_PARTS_BY_NAME: list[bool] = [False]


@contextmanager
def parts_by_name() -> Iterator[None]:
    """Within, a module that splits a fused tensor into parts (Phi-3's projections, Mixtral's
    experts) gives its state dict under the parts' own names, as it does once they are packed;
    outside, while every part is a plain linear, it gives the fused tensor transformers loads."""
    _PARTS_BY_NAME[0] = True
    try:
        yield
    finally:
        _PARTS_BY_NAME[0] = False


def fused_on_save(plain: bool) -> bool:
    """Whether a split module with all parts plain (``plain``) saves its fused tensor now."""
    return plain and not _PARTS_BY_NAME[0]


_FACTORIES: dict[str, callable] = {}


def register_adapter(*model_types: str):
    """Register a factory ``config -> ModelAdapter`` for Hugging Face ``model_type`` names."""

    def decorate(factory):
        for model_type in model_types:
            _FACTORIES[model_type] = factory
        return factory

    return decorate


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_FACTORIES))


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of a loaded Hugging Face model (causal LM or vision backbone), or a clear
    error naming what is supported."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in _FACTORIES:
        _unsupported(getattr(config, "model_type", None) or type(model).__name__)
    adapter = adapter_for_config(config)
    try:
        adapter.block_list(model)
    except AttributeError:
        head = "with its language-model head (e.g. AutoModelForCausalLM)"
        kind = head if adapter.modality == "text" else "as the backbone transformers loads"
        raise UnsupportedModelError(
            f"{type(model).__name__} does not hold '{config.model_type}' blocks where channelwise "
            f"looks for them; load the model {kind}"
        ) from None
    if adapter.prepare is not None:
        adapter.prepare(model)
    return adapter


def adapter_for_config(config) -> ModelAdapter:
    """The adapter a model with this Hugging Face config gets (before any weight is read)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _FACTORIES:
        _unsupported(model_type or type(config).__name__)
    return _FACTORIES[model_type](config)


def _unsupported(name: str) -> None:
    raise UnsupportedModelError(
        f"unsupported architecture '{name}'; supported model types: "
        f"{', '.join(supported_model_types())}"
    )


#: Norm classes computing ``x̂·(1 + weight)`` (Gemma) rather than ``x̂·weight``.
_OFFSET_NORMS: set[type] = set()


def register_offset_norm(*classes: type) -> None:
    """Declare norm classes whose scale is ``1 + weight`` (a family's adapter file does)."""
    _OFFSET_NORMS.update(classes)


def norm_gain(norm: nn.Module) -> torch.Tensor:
    """The per-channel factor ``norm`` multiplies by: its weight, or ``1 + weight`` (Gemma)."""
    weight = norm.weight.data
    return weight + 1 if type(norm) in _OFFSET_NORMS else weight


def set_norm_gain(norm: nn.Module, gain: torch.Tensor) -> None:
    """Make ``norm`` multiply by ``gain`` (the inverse of :func:`norm_gain`)."""
    offset = 1 if type(norm) in _OFFSET_NORMS else 0
    norm.weight.data.copy_((gain - offset).to(norm.weight.dtype))


def linear_weight(module: nn.Module, transposed: bool) -> nn.Parameter:
    """The weight as ``(out_features, in_features)``: a view, so in-place edits reach the module.

    GPT-2's ``Conv1D`` stores ``(in, out)``; ``transposed`` says so.
    """
    weight = module.weight
    return weight.data.t() if transposed else weight.data
