"""Apply a recipe to a model, save the result, and restore it on load.

``quantize(model, recipe, calibration)`` plans the recipe (every step's method is built and checked
against the model before any weight changes), then runs the steps block by block — through the
block-wise engine when a step or a static activation quantizer needs calibration activations —
and installs the activation quantizers. The model is changed in place.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from channelwise.adapters import ModelAdapter, adapter_for, linear_weight
from channelwise.adapters.base import transition_kwargs
from channelwise.calibrate import install_block_input_quantizers, quantize_block_activations
from channelwise.deploy.checkpoint import packed_layout, save_packed_weights
from channelwise.distributed import ProcessGroup, current_group
from channelwise.engine import BlockContext, model_device, run_blockwise
from channelwise.errors import ChannelwiseError, CheckpointError, DataSourceError, RecipeError
from channelwise.evaluate.perplexity import check_positions, check_token_ids, has_lm_head
from channelwise.kvcache.methods import (
    attach_kv_config,
    build_kv_method,
    offloadable_kv_methods,
)
from channelwise.methods import Method, build_method
from channelwise.methods.registry import method_classes, quantizes_transitions
from channelwise.offload import OffloadError, block_on_device, offloaded, save_offloaded
from channelwise.paths import output_folder, staged_folder
from channelwise.quant import QParams, spec_from_dict, spec_to_dict
from channelwise.quant.activation import InputQuantizer, input_quantizer, install_input_quantizer
from channelwise.quant.attention import (
    ATTENTION_INPUTS,
    AttentionQuantizers,
    attention_quantizers,
    install_attention_quantizers,
    static_entry,
    uncalibrated_attention,
)
from channelwise.quant.grid import round_weight_
from channelwise.recipe import Recipe, load_recipe
from channelwise.state import (
    ATTENTION_RANGES_FILE,
    FAILED_ATTR,
    KV_METHOD_ATTR,
    MARKER_FILE,
    METHODS_ATTR,
    RECIPE_ATTR,
    STATIC_QPARAMS_FILE,
    STEP_STATE_FILE,
)

log = logging.getLogger(__name__)


@dataclass
class CompressionResult:
    """What ``quantize`` did: the recipe, the calibration wall time in seconds, and the methods
    that ran (their diagnostics: chosen scales, per-layer choices, searched α …)."""

    recipe: Recipe
    calib_seconds: float
    calibration_samples: int
    methods: list[Method] = field(default_factory=list)


@contextmanager
def _failure_marked(model: nn.Module, recipe_name: str) -> Iterator[None]:
    """Mark ``model`` if the body fails (its finished blocks stay changed) and say so in a
    ChannelwiseError's message (the same error: its cause chain kept); ``quantize`` then refuses
    the model."""
    try:
        yield
    except BaseException as err:
        setattr(model, FAILED_ATTR, recipe_name)
        if isinstance(err, ChannelwiseError):
            err.args = (
                f"{err} (quantize may have changed part of the model in place before this "
                "failure: load a fresh copy before another attempt)",
            )
        raise


def quantize(
    model: nn.Module,
    recipe: str | Path | Recipe | dict,
    calibration: torch.Tensor | None = None,
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
    distributed: bool | None = None,
) -> CompressionResult:
    """Compress ``model`` in place with ``recipe`` (a preset name, YAML path, mapping or
    ``Recipe``).

    ``calibration`` holds token ids ``(n_samples, seq_len)`` (pixel values ``(n, 3, h, w)`` for a
    vision model); methods that observe activations need it. Raises a
    :class:`~channelwise.errors.ChannelwiseError` subclass on anything it cannot do.

    ``distributed``: calibrate across the processes of the initialized ``torch.distributed``
    group (default: whenever one with more than one process is initialized, e.g. under
    ``torchrun``). Every process passes the same model and all of ``calibration``; each works
    on its share of the batches (:mod:`channelwise.distributed`) and ends with the same model.
    """
    from channelwise.models import resolve_device

    recipe = load_recipe(recipe)
    if batch_size < 1:
        raise DataSourceError(f"batch_size must be at least 1, got {batch_size}")
    if device is not None:  # checked before any change: a bad one failed after a rotation
        device = resolve_device(device)
    if getattr(model, RECIPE_ATTR, None) is not None:
        raise ChannelwiseError(
            f"this model was already compressed with "
            f"'{getattr(model, RECIPE_ATTR).name}'; load a fresh copy first"
        )
    if getattr(model, FAILED_ATTR, None) is not None:
        raise ChannelwiseError(
            f"a failed quantize with '{getattr(model, FAILED_ATTR)}' may have changed part of "
            "this model in place; load a fresh copy first"
        )
    adapter = adapter_for(model)
    methods = plan(model, recipe)
    needs_data = needs_calibration(recipe)
    if needs_data and calibration is None:
        raise RecipeError(
            f"recipe '{recipe.name}' needs calibration data (static activation "
            "ranges or a calibrating method); pass calibration token ids (or images)"
        )
    if needs_data:
        check_calibration(calibration, adapter, model)
    if needs_data and adapter.modality == "text":
        check_positions(
            model,
            calibration.shape[-1],
            f"calibration samples of {calibration.shape[-1]} tokens",
            "--seqlen",
        )
    group = _process_group(distributed)
    kv_method = build_kv_method(recipe)
    n_samples = 0 if calibration is None or not needs_data else int(calibration.shape[0])
    if offloaded(model) is not None:
        check_offloadable(recipe, methods, kv_method)
    if group is not None:
        check_distributed(recipe, methods, kv_method)
        progress = progress and group.main
        if needs_data:
            calibration = group.shard(calibration, batch_size)

    transitions = dict(adapter.transitions) if quantizes_transitions(recipe) else {}

    def block_fn(ctx: BlockContext) -> None:
        for method in methods:
            method.apply(ctx)
        quantize_block_activations(model, ctx, recipe)
        if ctx.index in transitions:
            quantize_transition(model, ctx, transitions[ctx.index], methods, recipe)

    start = time.perf_counter()
    data = calibration if needs_data else None
    with _failure_marked(model, recipe.name), torch.no_grad():
        if kv_method is not None:  # exact weight-side changes come before any weight step
            kv_method.prepare_model(model, adapter, data, progress=progress)
        for method in methods:
            method.prepare_model(model, adapter, data, progress=progress)
        if has_static_ranges(recipe) or any(m.needs_calibration for m in methods):  # inputs needed
            run_blockwise(
                model,
                adapter,
                data,
                block_fn,
                batch_size=batch_size,
                device=device,
                progress=progress,
                group=group,
            )
        else:
            blocks = adapter.block_list(model)
            where = torch.device(device) if device is not None else model_device(model)
            for index in tqdm(
                range(len(blocks)), desc=recipe.name, disable=not progress, leave=False
            ):
                with block_on_device(model, blocks[index], where):
                    block_fn(BlockContext(index, blocks[index], adapter, [], [], where))
        if recipe.embedding is not None:
            embedding = model.get_input_embeddings()
            round_weight_(embedding, embedding.weight.data, recipe.embedding.spec("weight"))
        if kv_method is not None:
            attach_kv_config(model, kv_method.cache_config(model, adapter))
    missed = uncalibrated_attention(model)
    if missed:
        raise ChannelwiseError(
            f"recipe '{recipe.name}': the static attention quantizers of {missed[0]} were never "
            "calibrated (does a step install them outside the block loop?)"
        )
    setattr(model, RECIPE_ATTR, recipe)
    setattr(model, METHODS_ATTR, methods)
    setattr(model, KV_METHOD_ATTR, kv_method)
    return CompressionResult(recipe, time.perf_counter() - start, n_samples, methods)


def quantize_transition(
    model: nn.Module, ctx: BlockContext, path: str, methods: list[Method], recipe: Recipe
) -> None:
    """Run every step on the transition at ``path`` after block ``ctx`` (fed the block's
    outputs as they now are), then give its linears the recipe's input quantizers."""
    module = model.get_submodule(path)
    with block_on_device(model, module, ctx.device):
        transition = BlockContext(
            ctx.index,
            module,
            ctx.adapter.transition_adapter(),
            ctx.forward(),
            [transition_kwargs(module, kw) for kw in ctx.kwargs],
            ctx.device,
            progress=ctx.progress,
            group=ctx.group,
            model=model,
            path=path,
        )
        for method in methods:
            method.apply(transition)
        if recipe.activations is not None:
            install_block_input_quantizers(transition, recipe)


def _process_group(distributed: bool | None) -> ProcessGroup | None:
    group = current_group() if distributed is not False else None
    if distributed and group is None:
        raise ChannelwiseError(
            "distributed=True needs an initialized torch.distributed group of more than one "
            "process (launch with torchrun --nproc_per_node N)"
        )
    return group


def check_distributed(recipe: Recipe, methods: list[Method], kv_method) -> None:
    """Refuse, before any work, a recipe that cannot calibrate across processes."""
    where = f"recipe '{recipe.name}' cannot calibrate across processes"
    _refuse_steps_without(
        "distributed", methods, RecipeError, where,
        "runs in one process only (across processes: {}); run it as one process",
    )  # fmt: skip
    if has_static_attention(recipe):
        raise RecipeError(
            f"{where}: static attention ranges are calibrated in one process only; "
            "run it as one process"
        )
    if kv_method is not None and kv_method.needs_calibration:
        raise RecipeError(
            f"{where}: its KV-cache method calibrates in one process only; run it as one process"
        )


def _refuse_steps_without(
    flag: str, methods: list[Method], error: type[ChannelwiseError], where: str, why: str
) -> None:
    """Raise ``error`` for the first step whose class lacks ``flag``; ``why`` gets the list of
    steps that have it."""
    supported = sorted(name for name, cls in method_classes().items() if getattr(cls, flag))
    for method in methods:
        if not getattr(method, flag):
            raise error(f"{where}: step '{method.name}' {why.format(', '.join(supported))}")


def check_offloadable(recipe: Recipe, methods: list[Method], kv_method) -> None:
    """Refuse, before any work, a recipe an offloaded model cannot run block by block."""
    where = f"recipe '{recipe.name}' cannot run on a model offloaded to disk"
    _refuse_steps_without(
        "offloadable", methods, OffloadError, where,
        "changes the whole model at once (steps that work block by block: {})",
    )  # fmt: skip
    if kv_method is not None and not kv_method.offloadable:
        runs = ", ".join(offloadable_kv_methods())
        raise OffloadError(
            f"{where}: KV-cache method '{kv_method.name}' changes the whole model's weights at "
            f"once (KV-cache methods that run offloaded: {runs})"
        )


def needs_calibration(recipe: str | Path | Recipe) -> bool:
    """Whether ``recipe`` observes activations (static ranges or a calibrating method)."""
    recipe = load_recipe(recipe)
    kv_method = build_kv_method(recipe)
    return (
        has_static_ranges(recipe)
        or (kv_method is not None and kv_method.needs_calibration)
        or any(build_method(step, recipe).needs_calibration for step in recipe.steps)
    )


def check_calibration(calibration: torch.Tensor, adapter: ModelAdapter, model: nn.Module) -> None:
    """Token ids ``(n, seq)`` for a language model (inside ``model``'s vocabulary), pixel
    values ``(n, 3, h, w)`` for a vision model (at least one patch), at least one sample:
    anything else is one clear error, not a traceback from inside the model."""
    vision = adapter.modality == "vision"
    expected = "pixel values (n, 3, height, width)" if vision else "token ids (n, seq_len)"
    fits = isinstance(calibration, torch.Tensor) and (
        (calibration.dim() == 4 and calibration.shape[1] == 3 and calibration.is_floating_point())
        if vision
        else (calibration.dim() == 2 and not calibration.is_floating_point())
    )
    if not fits:
        got = (
            f"{tuple(calibration.shape)} {calibration.dtype}"
            if isinstance(calibration, torch.Tensor)
            else type(calibration).__name__
        )
        raise DataSourceError(f"calibration must be {expected} for '{adapter.family}'; got {got}")
    if calibration.shape[0] == 0:
        raise DataSourceError("calibration holds no samples")
    if not vision:
        check_token_ids(calibration, model, "calibration token ids")
    else:
        patch = getattr(getattr(model, "config", None), "patch_size", None)
        patch = patch[0] if isinstance(patch, list | tuple) else patch
        if isinstance(patch, int) and min(calibration.shape[2:]) < patch:
            raise DataSourceError(
                f"calibration images of {calibration.shape[2]}×{calibration.shape[3]} pixels are "
                f"smaller than one {patch}-pixel patch of '{adapter.family}'"
            )
        if adapter.check_image is not None:
            adapter.check_image(*calibration.shape[2:])


def has_static_ranges(recipe: Recipe) -> bool:
    """Whether the recipe calibrates activation or attention ranges once (static quantizers)."""
    static = recipe.activations is not None and not recipe.activations.dynamic
    return static or has_static_attention(recipe)


def has_static_attention(recipe: Recipe) -> bool:
    """Whether the recipe calibrates q/k/v or attention-probability ranges once."""
    attention = recipe.attention
    return attention is not None and any(
        args is not None and not args.dynamic
        for args in (attention.q, attention.k, attention.v, attention.probs)
    )


def plan(model: nn.Module, recipe: Recipe) -> list[Method]:
    """Build and check every step of ``recipe`` against ``model``; changes nothing."""
    adapter = adapter_for(model)
    if adapter.modality == "vision" and (recipe.embedding is not None or recipe.kv_cache):
        part = "an embedding quantizer" if recipe.embedding is not None else "a KV cache"
        raise RecipeError(
            f"recipe '{recipe.name}' has {part}, which a vision model does not have "
            f"('{adapter.family}'); drop that section"
        )
    check_recipe_fits(model, adapter, recipe)
    methods = [build_method(step, recipe) for step in recipe.steps]
    for method in methods:  # a step's own ordering rule words its refusal best
        method.check(model, adapter)
    quantizing = [method.name for method in methods if method.quantizes_weights]
    if len(quantizing) > 1:
        raise RecipeError(
            f"recipe '{recipe.name}': steps '{quantizing[0]}' and '{quantizing[1]}' both quantize "
            "the weights; a recipe has one quantizing step, after its transforms (the second "
            "would round weights the first already rounded)"
        )
    kv_method = build_kv_method(recipe)
    if kv_method is not None:
        kv_method.check(model, adapter)
    return methods


def check_recipe_fits(model: nn.Module, adapter: ModelAdapter, recipe: Recipe) -> None:
    """Fail before any work if a quantizer's granularity does not fit some linear's shape."""
    block = adapter.block_list(model)[0]
    for name, module in adapter.block_linears(block).items():
        out_features, in_features = linear_weight(module, adapter.transposed_weights).shape
        for role, args, shape in (
            ("weight", recipe.weights, (out_features, in_features)),
            ("activation", recipe.activations, (1, in_features)),
        ):
            if args is None:
                continue
            try:
                args.spec(role).granularity.block_shape(*shape)
            except RecipeError as exc:
                raise RecipeError(
                    f"recipe '{recipe.name}' does not fit {adapter.blocks}.*.{name} "
                    f"({out_features}×{in_features}): {exc}"
                ) from None
    if recipe.attention is not None:
        config = model.config
        attention = block.get_submodule(adapter.attention_module)
        head_dim = getattr(attention, "head_dim", None) or getattr(config, "head_dim", None)
        head_dim = head_dim or config.hidden_size // config.num_attention_heads
        for name in ("q", "k", "v", "probs"):
            args = getattr(recipe.attention, name)
            if args is None or name == "probs":
                continue
            try:
                args.spec("activation").granularity.block_shape(1, head_dim)
            except RecipeError as exc:
                raise RecipeError(
                    f"recipe '{recipe.name}': attention.{name} does not fit "
                    f"head_dim {head_dim}: {exc}"
                ) from None
    if recipe.embedding is not None:
        shape = tuple(model.get_input_embeddings().weight.shape)
        try:
            recipe.embedding.spec("weight").granularity.block_shape(*shape)
        except RecipeError as exc:
            raise RecipeError(
                f"recipe '{recipe.name}': embedding does not fit the {shape[0]}×{shape[1]} "
                f"token embedding: {exc}"
            ) from None
    acts = recipe.activations
    if acts is not None and not acts.dynamic and acts.granularity == "group":
        raise RecipeError(
            f"recipe '{recipe.name}': static activation ranges are per tensor or "
            "per channel; per-group activations must be dynamic: true"
        )


def save_quantized(model: nn.Module, tokenizer, out_dir: str | Path, force: bool = False) -> Path:
    """Write the model, tokenizer, recipe and static ranges; never destroys an input.

    A model whose linears were packed (:func:`channelwise.deploy.pack_model`) is written packed:
    integer codes with their scales, and ``channelwise.json`` lists each packed linear's spec.

    The folder is written under a temporary name and renamed into place, so an interrupted run
    leaves nothing half-written at ``out_dir``.
    """
    recipe: Recipe | None = getattr(model, RECIPE_ATTR, None)
    out = output_folder(out_dir, model, force)
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise ChannelwiseError(
            f"tokenizer must be a transformers tokenizer (or None), got {type(tokenizer).__name__}"
        )
    if tokenizer is None and has_lm_head(model):
        log.warning(
            "saving %s without a tokenizer: load_model reads one from the folder, so add it "
            "(pass the tokenizer, or copy its files in) before loading",
            out,
        )
    with staged_folder(out) as tmp:
        _write_checkpoint(model, tokenizer, recipe, tmp)
    return out


def _write_checkpoint(model: nn.Module, tokenizer, recipe: Recipe | None, tmp: Path) -> None:
    layout = packed_layout(model)
    if offloaded(model) is not None:
        layout |= save_offloaded(model, tmp)
    elif layout:  # our own module types: write the state dict as it is (no key renaming)
        save_packed_weights(model, tmp)
    else:
        model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if recipe is None:
        return
    (tmp / "recipe.yaml").write_text(recipe.to_yaml())
    marker = {
        "format": "packed" if layout else "fake-quant",
        "recipe": recipe.model_dump(mode="json"),
        "input_quantizers": _input_quantizer_specs(model),
    }
    if layout:
        marker["packed_linears"] = layout
    descriptions, ranges = _static_attention(model)
    if descriptions:
        marker["attention_quantizers"] = descriptions
        save_file(ranges, str(tmp / ATTENTION_RANGES_FILE))
    (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2))
    static = _static_qparams(model)
    if static:
        save_file(static, str(tmp / STATIC_QPARAMS_FILE))
    state = _step_state(model)
    if state:
        save_file(state, str(tmp / STEP_STATE_FILE))


def _static_qparams(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, module in model.named_modules():
        quantizer = input_quantizer(module)
        if quantizer is not None and quantizer.qparams is not None:
            # cloned: linears that share an input (RepQ-ViT's q/k/v) share one QParams
            tensors[f"{name}.scale"] = quantizer.qparams.scale.detach().cpu().clone()
            tensors[f"{name}.zero_point"] = quantizer.qparams.zero_point.detach().cpu().clone()
    return tensors


def _static_attention(model: nn.Module) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Each attention module's calibrated static entries: ``{module: {entry: description}}``
    for the marker and their tensors, keyed ``"<module>.<entry>.<name>"``."""
    descriptions: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        quant = attention_quantizers(module)
        if quant is None or not quant.static():
            continue
        descriptions[name] = {}
        for entry, quantizer in quant.static().items():
            descriptions[name][entry] = quantizer.describe()
            for key, tensor in quantizer.tensors().items():
                tensors[f"{name}.{entry}.{key}"] = tensor.detach().cpu().contiguous()
    return descriptions, tensors


def _restore_static_attention(model: nn.Module, folder: Path, saved: dict) -> None:
    """Install the static attention entries a folder saved (before the recipe's dynamic ones)."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{folder / MARKER_FILE}: malformed attention_quantizers")
    tensors = _side_tensors(folder / ATTENTION_RANGES_FILE)
    for name, entries in saved.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"{folder} quantizes the attention of {name}, which this model does not have; "
                "the checkpoint does not match its config"
            ) from None
        if not isinstance(entries, dict) or not set(entries) <= set(ATTENTION_INPUTS):
            raise CheckpointError(f"{folder / MARKER_FILE}: malformed entry for {name}")
        built = {}
        for entry, description in entries.items():
            prefix = f"{name}.{entry}."
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                built[entry] = static_entry(description, own)
            except ValueError as exc:
                raise CheckpointError(
                    f"{folder}: the static attention quantizer {name}.{entry} cannot be "
                    f"restored ({exc}); the checkpoint is incomplete or corrupt"
                ) from None
        install_attention_quantizers(model, [module], AttentionQuantizers(**built))


def _input_quantizer_specs(model: nn.Module) -> dict[str, dict]:
    return {
        name: {"spec": spec_to_dict(quantizer.spec), "static": quantizer.qparams is not None}
        for name, module in model.named_modules()
        if (quantizer := input_quantizer(module)) is not None
    }


def _step_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every step's ``saved_state()``, keyed ``"<step index>/<key>"``, and the KV-cache
    method's, keyed ``"kv/<key>"``."""
    tensors = {}
    for index, method in enumerate(getattr(model, METHODS_ATTR, None) or ()):
        for key, tensor in method.saved_state().items():
            tensors[f"{index}/{key}"] = tensor.detach().cpu().contiguous()
    kv_method = getattr(model, KV_METHOD_ATTR, None)
    if kv_method is not None:
        for key, tensor in kv_method.saved_state().items():
            tensors[f"kv/{key}"] = tensor.detach().cpu().contiguous()
    return tensors


def _side_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A saved folder's optional safetensors side file (``{}`` if absent)."""
    from channelwise.deploy.checkpoint import read_safetensors

    return read_safetensors(path) if path.is_file() else {}


def restore_quantized(model: nn.Module, folder: Path) -> None:
    """Re-install the runtime ops of a saved model (its weights are already on grid).

    Each step's ``restore`` runs first (online ops such as rotations), then the activation
    quantizers, each with the spec it was saved with (a method may have chosen its own).
    """
    from channelwise.deploy.checkpoint import read_marker

    marker = read_marker(folder)
    recipe = Recipe.from_dict(marker.get("recipe"), origin=str(folder / MARKER_FILE))
    adapter = adapter_for(model)
    state = _side_tensors(folder / STEP_STATE_FILE)
    methods = [build_method(step, recipe) for step in recipe.steps]
    for index, method in enumerate(methods):
        method.check(model, adapter)
        prefix = f"{index}/"
        method.restore(
            model, adapter, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        )
    saved = marker.get("input_quantizers")
    if saved is None and recipe.activations is not None:  # written before per-module specs
        saved = {
            f"{adapter.block_path(index)}.{name}": {
                "spec": spec_to_dict(recipe.activations.spec("activation")),
                "static": not recipe.activations.dynamic,
            }
            for index in range(len(adapter.block_list(model)))
            for name in adapter.linear_names()
        }
    if saved:
        static = _side_tensors(folder / STATIC_QPARAMS_FILE)
        for key, entry in saved.items():
            try:
                module = model.get_submodule(key)
            except AttributeError:
                raise ChannelwiseError(
                    f"{folder} quantizes the input of {key}, which this model does not have; "
                    "the checkpoint does not match its config"
                ) from None
            if not isinstance(entry, dict) or not isinstance(entry.get("spec"), dict):
                raise ChannelwiseError(f"{folder / MARKER_FILE}: malformed entry for {key}")
            qparams = None
            if entry.get("static"):
                if f"{key}.scale" not in static or f"{key}.zero_point" not in static:
                    raise ChannelwiseError(
                        f"{folder} is missing the static activation "
                        f"ranges of {key}; the checkpoint is incomplete"
                    )
                qparams = QParams(static[f"{key}.scale"], static[f"{key}.zero_point"])
            install_input_quantizer(module, InputQuantizer(spec_from_dict(entry["spec"]), qparams))
    if "attention_quantizers" in marker:
        _restore_static_attention(model, folder, marker["attention_quantizers"])
    if recipe.attention is not None:
        modules = [
            block.get_submodule(adapter.attention_module) for block in adapter.block_list(model)
        ]
        install_attention_quantizers(model, modules, recipe.attention.specs())
        if recipe.embedding is not None:
            embedding = model.get_input_embeddings()
            round_weight_(embedding, embedding.weight.data, recipe.embedding.spec("weight"))
    missed = uncalibrated_attention(model)
    if missed:
        raise CheckpointError(
            f"{folder} is missing the static attention ranges of {missed[0]}; the checkpoint "
            "is incomplete"
        )
    kv_method = build_kv_method(recipe)
    if kv_method is not None:
        kv_method.check(model, adapter)
        kv_method.restore(
            model, adapter, {k[len("kv/") :]: v for k, v in state.items() if k.startswith("kv/")}
        )
        attach_kv_config(model, kv_method.cache_config(model, adapter))
    setattr(model, RECIPE_ATTR, recipe)
    setattr(model, METHODS_ATTR, methods)
    setattr(model, KV_METHOD_ATTR, kv_method)
