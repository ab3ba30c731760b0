"""Packed checkpoints: what ``channelwise.json`` says about the packed linears, and loading them.

A packed folder is a transformers checkpoint whose quantized block linears are stored as
``<name>.qweight`` (uint8 codes), ``<name>.scale`` and, if asymmetric, ``<name>.zero``, with
``channelwise.json`` (``"format": "packed"``) listing each packed linear's spec. Loading builds
the architecture from ``config.json``, puts a :class:`PackedLinear` of that spec at each listed
name, and reads the safetensors files (never a pickle) with every key, shape and dtype checked.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from channelwise.adapters import adapter_for_config
from channelwise.deploy.dual_grained import PackedDualGrained
from channelwise.deploy.half import keep_half_floats
from channelwise.deploy.packed import (
    FLOAT_DTYPE_ATTR,
    _set_submodule,
    grid_keys,
    narrow_floats,
    storage_key,
)
from channelwise.deploy.packed_modules import (
    PackedCodes,
    PackedEmbedding,
    PackedLinear,
    PackedTiedHead,
)
from channelwise.errors import CheckpointError, PackingError
from channelwise.quant import spec_from_dict, spec_to_dict
from channelwise.state import MARKER_FILE


def packed_layout(model: nn.Module) -> dict[str, dict]:
    """``{module name: {"kind", "spec", …}}`` for every packed module of ``model``."""
    return {
        name: layout_entry(module)
        for name, module in model.named_modules()
        if isinstance(module, PackedCodes | PackedTiedHead)
    }


def layout_entry(module: nn.Module) -> dict:
    """What ``channelwise.json`` says of one packed module."""
    if isinstance(module, PackedCodes):
        return {"spec": spec_to_dict(module.spec), **module.layout()}
    return module.layout()


def save_packed_weights(model: nn.Module, folder: Path) -> None:
    """``config.json`` (and generation config) plus the state dict in ``model.safetensors``.

    ``save_pretrained`` would rename keys for some families (GPT-NeoX's ``lm_head`` is written
    as ``embed_out``) and expects its own module types. Tensors tied to another are stored once;
    float tensors that :func:`round_float_tensors_` rounded are stored in that dtype.
    """
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tensors, stored = {}, set()
    for key, tensor in model.state_dict().items():
        where = storage_key(tensor)
        if where in stored:
            continue  # tied to a tensor already written
        stored.add(where)
        tensors[key] = tensor
    tensors = narrow_floats(tensors, getattr(model, FLOAT_DTYPE_ATTR, None), grid_keys(model))
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def load_packed(folder: Path, layout: dict[str, dict], dtype: torch.dtype) -> nn.Module:
    """The model saved in ``folder`` with its packed linears, on the CPU, in eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    adapter = adapter_for_config(config)  # refuse an unknown architecture
    vision = adapter.modality == "vision"
    # Parameters on meta, filled from the files: a packed 7B model is never float32 in memory.
    # A family reshaped on first use keeps views into its fused tensors: built for real.
    empty = init_empty_weights(include_buffers=False) if adapter.prepare is None else nullcontext()
    with empty:
        model = (AutoModel if vision else AutoModelForCausalLM).from_config(
            config, dtype=dtype, **adapter.build_kwargs
        )
    model.tie_weights()  # accelerate's meta parameters are not tied yet
    if adapter.prepare is not None:  # the packed parts are saved under their split names
        adapter.prepare(model)
    embeddings: dict[str, PackedEmbedding] = {}
    for name, entry in sorted(layout.items(), key=lambda item: item[1].get("kind") == "tied_head"):
        try:
            old = model.get_submodule(name)
            kind = entry.get("kind", "linear")
            if kind == "tied_head":
                packed = PackedTiedHead(embeddings[entry["embedding"]], entry["embedding"])
            elif kind == "embedding":
                packed = embeddings[name] = PackedEmbedding(
                    *old.weight.shape, _spec(entry), entry.get("output_scale", 1.0)
                )
            elif kind == "dual_grained":
                out_features, in_features = _linear_shape(old, entry["transposed"])
                packed = PackedDualGrained(
                    in_features, out_features, entry["group_size"], entry["bias"],
                    entry["transposed"],
                )  # fmt: skip
            else:
                out_features, in_features = _linear_shape(old, entry["transposed"])
                packed = PackedLinear(
                    in_features, out_features, _spec(entry), entry["bias"], entry["transposed"]
                )
        except (AttributeError, KeyError, TypeError, ValueError, PackingError) as exc:
            raise CheckpointError(f"{folder}: packed entry '{name}' does not fit: {exc}") from None
        _set_submodule(model, name, packed)
    stored = _load_state(model, folder)
    if dtype == torch.float32:
        keep_half_floats(model, stored)
    return model.eval()


def _spec(entry: dict):
    return spec_from_dict(entry["spec"])


def _linear_shape(module: nn.Module, transposed: bool) -> tuple[int, int]:
    weight = module.weight
    return tuple(weight.shape[::-1]) if transposed else tuple(weight.shape)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file; a corrupt or unreadable one is a
    :class:`CheckpointError`."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None


def _add_created_biases(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give a plain linear built without a bias the one the checkpoint holds for it (a
    reparameterization created it, e.g. RepQ-ViT on Swin's ``reduction``; its config cannot
    say so); any other tensor the model lacks is still refused."""
    known = set(model.state_dict())
    for key, tensor in state.items():
        if key in known or not key.endswith(".bias"):
            continue
        try:
            module = model.get_submodule(key[: -len(".bias")])
        except AttributeError:
            continue
        if (
            type(module) is nn.Linear
            and module.bias is None
            and tensor.shape == (module.out_features,)
        ):
            weight = module.weight
            module.bias = nn.Parameter(
                torch.empty(tensor.shape, dtype=weight.dtype, device=weight.device),
                requires_grad=False,
            )


def _load_state(model: nn.Module, folder: Path) -> dict[str, torch.dtype]:
    """Load ``folder``'s tensors into ``model``; returns the dtype each key was stored in."""
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if f.name.startswith("model")]
    if not files:
        raise CheckpointError(f"{folder}: no model*.safetensors file")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(read_safetensors(file))
    _add_created_biases(model, state)
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{folder}: tensors the model does not have: {', '.join(unexpected[:5])}; the "
            "checkpoint does not match its config.json"
        )
    stored = {key: tensor.dtype for key, tensor in state.items()}
    for key, tensor in state.items():
        want = expected[key]
        if tensor.is_floating_point() and want.is_floating_point() and tensor.dtype != want.dtype:
            if torch.finfo(tensor.dtype).bits < torch.finfo(want.dtype).bits:
                state[key] = tensor = tensor.to(want.dtype)  # stored narrower: widening is exact
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise CheckpointError(
                f"{folder}: '{key}' is {tuple(tensor.shape)} {tensor.dtype}, the model expects "
                f"{tuple(want.shape)} {want.dtype}"
            )
    missing = set(expected) - set(state)
    twins = _shared_storage(model)
    missing = {key for key in missing if not (twins.get(key, set()) & set(state))}
    if missing:
        raise CheckpointError(
            f"{folder}: missing tensors: {', '.join(sorted(missing)[:5])}; the checkpoint is "
            "incomplete"
        )
    empty = any(tensor.is_meta for tensor in expected.values())
    model.load_state_dict(state, strict=False, assign=empty)
    if empty:
        _retie(model, twins)
        left = [key for key, tensor in model.state_dict().items() if tensor.is_meta]
        if left:
            raise CheckpointError(
                f"{folder}: missing tensors: {', '.join(left[:5])}; the checkpoint is incomplete"
            )
    return stored


def _retie(model: nn.Module, twins: dict[str, set[str]]) -> None:
    """After ``load_state_dict(assign=True)`` a tied tensor not in the files (an LM head) still
    holds its meta parameter: share its loaded twin again."""
    params = model.state_dict(keep_vars=True)
    for key, others in twins.items():
        loaded = [other for other in others if not params[other].is_meta]
        if params[key].is_meta and loaded:
            path, _, name = key.rpartition(".")
            module = model.get_submodule(path)
            slots = module._parameters if name in module._parameters else module._buffers
            slots[name] = params[loaded[0]]


def _shared_storage(model: nn.Module) -> dict[str, set[str]]:
    """For each state-dict key, the other keys sharing its storage (tied embeddings); on
    ``meta`` (no storage) the keys of one parameter object."""
    by_storage: dict[tuple, set[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        where = ("meta", id(tensor)) if tensor.is_meta else storage_key(tensor)
        by_storage.setdefault(where, set()).add(key)
    return {key: group - {key} for group in by_storage.values() for key in group}


def read_marker(folder: Path) -> dict:
    """``channelwise.json`` of ``folder`` as a dict, with a clear error if unreadable."""
    path = folder / MARKER_FILE
    try:
        marker = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    if not isinstance(marker, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(marker).__name__}")
    for key in ("packed_linears", "input_quantizers"):
        entries = marker.get(key)
        if entries is not None and not (
            isinstance(entries, dict) and all(isinstance(e, dict) for e in entries.values())
        ):
            raise CheckpointError(f"{path}: '{key}' must map module names to objects")
    return marker
