"""Models larger than RAM: block weights left on disk, one block materialised at a time.

:func:`load_offloaded` builds the model with every decoder block's parameters on PyTorch's
``meta`` device (no memory) and reads only what lies outside the blocks (embeddings, final
norm, LM head). The safetensors files are opened lazily (memory-mapped, one tensor read at a
time). A block is materialised from disk when it runs and dropped right after, so a forward
pass (perplexity, generation) holds one block at a time; :func:`block_on_device` lets the
calibration engine hold a block while a method works on it and writes the changed block back
to a private overlay folder, from which every later read of that block comes. Saving
(:func:`save_offloaded`) writes the model shard by shard, one block per file.

Peak memory is then the resident parts + one block + the calibration activations, instead of
the whole model. Only steps that work on one block at a time can run this way (a method opts
in with ``Method.offloadable``); a step that changes every block at once in ``prepare_model``
(rotations, global searches) and a compressed KV cache are refused before any work. A family
that splits fused tensors on first use (Phi-3's projections, Mixtral's experts) is split on
``meta`` at load; a block read from the checkpoint goes through ``load_state_dict``, whose hooks
split the fused tensors, and it saves them fused again while its parts are plain linears.
Saving packs the block linears one block at a time after :func:`channelwise.deploy.pack_model`
(the packed format), or writes the float weights on the grid (the fake-quant format).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from channelwise.errors import ChannelwiseError, CheckpointError
from channelwise.paths import channelwise_home
from channelwise.state import MARKER_FILE, OFFLOAD_ATTR

INDEX_FILE = "model.safetensors.index.json"

#: safetensors' names of the dtypes that are not floating point, as torch names them.
_NON_FLOAT_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
}


class OffloadError(ChannelwiseError):
    """What an offloaded model cannot do (a step, a family or a format), said before any work."""


class SafetensorsFolder:
    """Tensors by name from safetensors files, read one at a time from memory-mapped files."""

    def __init__(
        self,
        folder: Path,
        files: dict[str, Path],
        stored: dict[str, str] | None = None,
        dtypes: dict[str, str] | None = None,
    ) -> None:
        self.folder = folder
        self.files = files
        self.stored = stored or {}  # a renamed tensor's name in its file
        self.dtypes = dtypes or {}  # each tensor's dtype as its file's header names it ("F32")

    def renamed(self, renames: tuple[tuple[str, str], ...]) -> SafetensorsFolder:
        """The same tensors under names rewritten by ``renames`` (regex, replacement), in
        order; two tensors renamed to one name are an error."""
        if not renames:
            return self
        files: dict[str, Path] = {}
        stored: dict[str, str] = {}
        dtypes: dict[str, str] = {}
        for key, path in self.files.items():
            name = key
            for pattern, replacement in renames:
                name = re.sub(pattern, replacement, name)
            if name in files:
                first = stored[name]
                raise CheckpointError(f"{self.folder}: tensors {first} and {key} both name {name}")
            files[name], stored[name] = path, self.stored.get(key, key)
            if key in self.dtypes:
                dtypes[name] = self.dtypes[key]
        return SafetensorsFolder(self.folder, files, stored, dtypes)

    @classmethod
    def open(cls, folder: Path) -> SafetensorsFolder:
        """A checkpoint folder: ``model.safetensors``, or the shards its
        ``model.safetensors.index.json`` lists; every file's header is read now, so a corrupt
        file is refused before any work."""
        index = folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = {str(key): folder / str(name) for key, name in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index ({exc})") from exc
            missing = sorted({path.name for path in files.values() if not path.is_file()})
            if missing:
                raise CheckpointError(
                    f"{folder}: shard {missing[0]} named in {INDEX_FILE} is missing"
                )
            headers = {path: _header_dtypes(path) for path in set(files.values())}
            for key, path in files.items():
                if key not in headers[path]:
                    raise CheckpointError(
                        f"{folder}: {INDEX_FILE} puts tensor {key} in {path.name}, which does "
                        "not hold it"
                    )
            return cls(folder, files, dtypes={key: headers[p][key] for key, p in files.items()})
        if (folder / "model.safetensors").is_file():
            return cls.of_file(folder / "model.safetensors")
        raise CheckpointError(
            f"{folder} holds no model.safetensors (nor a {INDEX_FILE}); offloading reads a "
            "safetensors checkpoint folder"
        )

    @classmethod
    def of_file(cls, path: Path) -> SafetensorsFolder:
        """The tensors of one safetensors file."""
        dtypes = _header_dtypes(path)
        return cls(path.parent, dict.fromkeys(dtypes, path), dtypes=dtypes)

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors named ``keys``, each a private copy: every file is opened, read and
        closed again (a tensor left on the memory map would share the file's pages, and an
        in-place change would stay in the mapping for the next read)."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.files[key], []).append(key)
        out = {}
        for path, names in by_file.items():
            with _opened(path) as handle:
                for key in names:
                    try:
                        out[key] = handle.get_tensor(self.stored.get(key, key)).clone()
                    except SafetensorError as exc:
                        raise CheckpointError(f"{path}: cannot read tensor {key} ({exc})") from exc
        return out


@contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """``path`` opened with ``safe_open``; a corrupt or unreadable file is a
    :class:`CheckpointError` naming it."""
    try:
        handle = safe_open(str(path), "pt")
    except SafetensorError as exc:
        raise CheckpointError(
            f"{path}: unreadable safetensors file, truncated or not a safetensors file ({exc})"
        ) from exc
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc
    with handle:
        yield handle


def _header_dtypes(path: Path) -> dict[str, str]:
    """``{tensor name: dtype}`` from the header of the safetensors file ``path``."""
    with _opened(path) as handle:
        return {key: handle.get_slice(key).get_dtype() for key in handle.keys()}


class DiskWeights:
    """Where an offloaded model's block parameters live: the source checkpoint, or this
    object's overlay folder once a block was changed and written back."""

    def __init__(
        self,
        model: nn.Module,
        blocks: list[nn.Module],
        source: SafetensorsFolder,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        names = {id(module): name for name, module in model.named_modules()}
        self.blocks = blocks
        self.prefixes = [names[id(block)] + "." for block in blocks]
        self.source = source
        self.block_keys = [[k for k in source.files if k.startswith(p)] for p in self.prefixes]
        self.dtype = dtype
        self.device = device
        root = channelwise_home() / "offload"
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_overlays(root)
        self.overlay = Path(tempfile.mkdtemp(prefix=f"{_overlay_prefix()}-", dir=root))
        _OWN_OVERLAYS.add(self.overlay)
        self._finalizer = weakref.finalize(self, _remove_overlay, self.overlay)
        self.written: set[int] = set()
        self.pack_on_save = False  # set by pack_model: save_offloaded packs each block
        self.held: set[int] = set()
        self.transient: set[int] = set()
        for index, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda _m, _a, index=index: self._on_call(index))
            block.register_forward_hook(
                lambda _m, _a, _o, index=index: self._after_call(index), always_call=True
            )

    def materialised(self, index: int) -> bool:
        return not any(p.is_meta for p in self.blocks[index].parameters())

    def load(self, index: int, device: torch.device | None = None) -> None:
        """Read block ``index``'s parameters from disk (its overlay file once written back)."""
        block, prefix = self.blocks[index], self.prefixes[index]
        if index in self.written:
            source = SafetensorsFolder.of_file(self.overlay_file(index))
            keys = list(source.files)
        else:
            source, keys = self.source, self.block_keys[index]
        device = device or self.device
        state = {
            key.removeprefix(prefix): _cast(value, device, self.dtype)
            for key, value in source.read(keys).items()
        }
        try:  # the hooks of a split module (Phi-3, Mixtral) split its fused tensors
            block.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
            raise CheckpointError(
                f"{self.source.folder}: block {prefix.rstrip('.')}: {lines[0] if lines else exc}"
            ) from exc
        missing = [name for name, param in block.named_parameters() if param.is_meta]
        if missing:
            raise CheckpointError(
                f"{self.source.folder}: tensor {prefix}{missing[0]} is not in the checkpoint; "
                "refusing to fill it with random values"
            )

    def release(self, index: int) -> None:
        """Drop block ``index``'s parameters (back to ``meta``); its buffers stay."""
        for module in self.blocks[index].modules():
            for name, param in list(module._parameters.items()):
                if param is not None and not param.is_meta:
                    module._parameters[name] = nn.Parameter(
                        param.detach().to("meta"), requires_grad=param.requires_grad
                    )
        _return_freed_memory()

    def write_back(self, index: int) -> None:
        """Save block ``index``'s current parameters; later loads read them instead."""
        params = self.blocks[index].named_parameters(
            self.prefixes[index].rstrip("."), remove_duplicate=False
        )
        tensors = {name: param.detach().to("cpu").contiguous() for name, param in params}
        target = self.overlay_file(index)
        partial = target.with_suffix(".partial")
        save_file(tensors, str(partial), metadata={"format": "pt"})
        partial.replace(target)
        self.written.add(index)

    @contextmanager
    def holding(
        self, index: int, device: torch.device | None = None, keep_changes: bool = False
    ) -> Iterator[nn.Module]:
        """Block ``index`` materialised on ``device`` for the duration; its changes written back
        on exit when ``keep_changes``."""
        self._drop_transient()
        self.load(index, device)
        self.held.add(index)
        try:
            yield self.blocks[index]
            if keep_changes:
                self.write_back(index)
        finally:
            self.held.discard(index)
            self.release(index)

    def overlay_file(self, index: int) -> Path:
        return self.overlay / f"block-{index:05d}.safetensors"

    def _on_call(self, index: int) -> None:
        if index in self.held or self.materialised(index):
            return
        self._drop_transient()
        self.load(index)
        self.transient.add(index)

    def _after_call(self, index: int) -> None:
        if index in self.transient:
            self.transient.discard(index)
            self.release(index)

    def _drop_transient(self) -> None:
        for index in list(self.transient):  # a forward stopped inside a block skips its hook
            self.transient.discard(index)
            self.release(index)


#: The overlay folders this process made (a folder of its process id that is not among them was
#: left by an earlier process that had the same id).
_OWN_OVERLAYS: set[Path] = set()


def _overlay_prefix() -> str:
    """``blocks-<boot id>-<pid>``: a process id names this process only on this machine since
    its boot (a cache folder may be shared between machines or containers)."""
    return f"blocks-{_boot_id()}-{os.getpid()}"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:12]
    except OSError:
        return platform.node().replace("-", "") or "host"


def _remove_stale_overlays(root: Path) -> None:
    """Remove the overlay folders this machine's processes left when they were killed before
    their clean-up (a large model's written-back blocks are gigabytes). Folders made on another
    machine or container (another boot id) are left alone."""
    prefix = f"blocks-{_boot_id()}-"
    for folder in root.glob(prefix + "*-*"):
        pid = folder.name[len(prefix) :].split("-")[0]
        if not pid.isdigit() or folder in _OWN_OVERLAYS:
            continue
        if int(pid) == os.getpid() or not _running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _remove_overlay(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    _OWN_OVERLAYS.discard(folder)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def offloaded(model: nn.Module) -> DiskWeights | None:
    """The model's :class:`DiskWeights` when it was loaded by :func:`load_offloaded`."""
    return getattr(model, OFFLOAD_ATTR, None)


def load_offloaded(
    spec: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, object]:
    """Load ``(model, tokenizer)`` with the decoder blocks' weights left on disk.

    ``spec`` is what :func:`channelwise.load_model` takes (a local checkpoint folder, an
    embedded name, a ``.gguf`` converted once). Only the parts outside the blocks are read now;
    each block is read when it runs. A compressed channelwise folder saved with float weights
    (``--format fake``, what an offloaded model saves) loads with its input quantizers; a packed
    one is refused (load it with ``load_model``).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from channelwise.adapters import adapter_for_config, parts_by_name
    from channelwise.models import ModelNotFoundError, resolve_device, resolve_model

    device = resolve_device(device)
    source = resolve_model(spec)
    if not isinstance(source, Path):
        raise ModelNotFoundError(
            f"offloading reads a local checkpoint folder, and '{spec}' is not one"
        )
    compressed = (source / MARKER_FILE).is_file()
    if compressed:
        from channelwise.deploy.checkpoint import read_marker

        if read_marker(source).get("format") != "fake-quant":
            raise OffloadError(
                f"{source} holds packed integer codes; offloading reads float weights (a "
                "folder saved with --format fake): load this one with load_model"
            )
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"could not read the config of '{spec}': {exc}") from exc
    adapter = adapter_for_config(config)
    if adapter.modality != "text":
        raise OffloadError("offloading supports causal language models only")
    checkpoint = SafetensorsFolder.open(source).renamed(adapter.checkpoint_renames)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.name_or_path = str(source)
    if adapter.prepare is not None:
        adapter.prepare(model)  # on meta: a split block reads its fused tensors when loaded
    with parts_by_name():
        expected = {key: value.dtype for key, value in model.state_dict().items()}
    expected |= {key: value.dtype for key, value in model.state_dict().items()}  # fused names
    strangers = sorted(checkpoint.stored.get(k, k) for k in checkpoint.files if k not in expected)
    if strangers:
        raise OffloadError(
            f"{source}: {len(strangers)} saved tensor(s) are named differently from the model's "
            f"parameters (first: {strangers[0]}); offloading reads a checkpoint by the model's "
            "own tensor names (or the family's known renames), not through transformers' "
            "conversions"
        )
    check_float_dtypes(checkpoint, expected)
    blocks = list(adapter.block_list(model))
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    slots = [
        slot for slot in _meta_slots(model, "") if id(slot[0]._parameters[slot[1]]) not in in_blocks
    ]
    slots = [slot for slot in slots if slot[2] in checkpoint]  # a tied head: tie_weights below
    _fill(slots, checkpoint.read([key for *_, key in slots]), device, dtype)
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta and id(p) not in in_blocks]
    if left:
        raise CheckpointError(
            f"{source}: {len(left)} tensor(s) the model needs are not in its checkpoint "
            f"(first: {left[0]}); refusing to fill them with random values"
        )
    model.requires_grad_(False)
    weights = DiskWeights(model, blocks, checkpoint, dtype, device)
    setattr(model, OFFLOAD_ATTR, weights)
    if compressed:
        _restore_offloaded(model, source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"could not load the tokenizer of '{spec}': {exc}") from exc
    return model.eval(), tokenizer


def check_float_dtypes(checkpoint: SafetensorsFolder, expected: dict[str, torch.dtype]) -> None:
    """Refuse a saved tensor of an integer or boolean dtype where the model holds floats
    (``expected``: the model's state-dict dtypes): offloaded, a block would fail deep inside
    its first matrix product; through transformers, the tensor is cast to zeros."""
    for key, stored in checkpoint.dtypes.items():
        wanted = expected.get(key)
        if wanted is None or not wanted.is_floating_point or stored.startswith(("F", "BF")):
            continue
        raise CheckpointError(
            f"{checkpoint.folder}: tensor {checkpoint.stored.get(key, key)} is stored as "
            f"{_NON_FLOAT_DTYPES.get(stored, stored)}, where the model its config describes "
            "holds floating-point values"
        )


def _restore_offloaded(model: nn.Module, folder: Path) -> None:
    """Re-install a compressed folder's runtime ops (input quantizers) on an offloaded model,
    after refusing a recipe that could not have run offloaded."""
    from channelwise.compress import check_offloadable, restore_quantized
    from channelwise.deploy.checkpoint import read_marker
    from channelwise.kvcache.methods import build_kv_method
    from channelwise.methods import build_method
    from channelwise.recipe import Recipe

    recipe = Recipe.from_dict(read_marker(folder).get("recipe"), origin=str(folder / MARKER_FILE))
    methods = [build_method(step, recipe) for step in recipe.steps]
    check_offloadable(recipe, methods, build_kv_method(recipe))
    restore_quantized(model, folder)


def _meta_slots(root: nn.Module, prefix: str) -> list[tuple[nn.Module, str, str]]:
    """``(module, parameter name, checkpoint key)`` of each parameter under ``root`` that is on
    ``meta``; keys are ``prefix`` + the parameter's path under ``root``."""
    slots = []
    for module_name, module in root.named_modules(remove_duplicate=False):
        for name, param in module._parameters.items():
            if param is not None and param.is_meta:
                path = f"{module_name}.{name}" if module_name else name
                slots.append((module, name, prefix + path))
    return slots


def _fill(
    slots: list[tuple[nn.Module, str, str]],
    tensors: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Give each slot's parameter the tensor under its key, as ``dtype`` on ``device``."""
    for module, name, key in slots:
        param, value = module._parameters[name], tensors[key]
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(
                f"tensor {key} has shape {tuple(value.shape)}; the model its config describes "
                f"expects {tuple(param.shape)}"
            )
        value = value.to(device=device, dtype=dtype)
        module._parameters[name] = nn.Parameter(value, requires_grad=param.requires_grad)


def _cast(value: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)


def offloaded_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters take whole in memory, those waiting on disk included."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _return_freed_memory() -> None:
    """Give the memory of a dropped block back to the system (glibc's ``malloc_trim``).

    Freed blocks otherwise stay in the allocator's heap, which glibc rarely gives back: on
    SmolLM2 the process held about the whole model again after one RTN pass (peak 1,305 MiB,
    against 694 MiB trimmed). Elsewhere than glibc this does nothing."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


@contextmanager
def block_on_device(model: nn.Module, block: nn.Module, device: torch.device) -> Iterator[None]:
    """Hold ``block`` on ``device`` while a method works on it: an ordinary model moves it
    there and back; an offloaded one reads it from disk and writes the changed block back."""
    weights = offloaded(model)
    if weights is None:
        home = next(block.parameters()).device
        block.to(device)
        try:
            yield
        finally:
            block.to(home)
        return
    with weights.holding(weights.blocks.index(block), device, keep_changes=True):
        yield


@contextmanager
def block_readable(model: nn.Module, block: nn.Module) -> Iterator[None]:
    """Hold ``block``'s weights readable for the duration: an offloaded block is read from disk
    (nothing written back); an ordinary model's block is left where it is."""
    weights = offloaded(model)
    if weights is None:
        yield
        return
    with weights.holding(weights.blocks.index(block)):
        yield


def home_device(model: nn.Module, block: nn.Module) -> torch.device:
    """Where a block's outputs go between steps: the device of its parameters, or of the
    resident parts for an offloaded model."""
    weights = offloaded(model)
    return weights.device if weights is not None else next(block.parameters()).device


def save_offloaded(model: nn.Module, folder: Path) -> dict[str, dict]:
    """Write an offloaded model as a sharded safetensors checkpoint: the resident parts in one
    shard, then one shard per block. Returns the packed linears' layout (``channelwise.json``).

    Float weights (the fake-quant format, which transformers loads): a block written back after
    a step is its overlay file, hard-linked into ``folder`` (copied across file systems), so a
    model larger than memory is not read and written a second time. After
    :func:`channelwise.deploy.pack_model`, each block is read once more and its linears are
    written as integer codes (the packed format, which :func:`channelwise.load_model` loads
    without building the float model)."""
    from channelwise.adapters import adapter_for, parts_by_name
    from channelwise.deploy.packed import FLOAT_DTYPE_ATTR, grid_keys, narrow_floats

    weights = offloaded(model)
    blocks = len(weights.blocks)
    total = blocks + 1
    shard = [f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]
    prefixes = tuple(weights.prefixes)
    resident = {
        key: value
        for key, value in model.state_dict().items()
        if not key.startswith(prefixes) and not value.is_meta
    }
    weight_map: dict[str, str] = {}
    layout: dict[str, dict] = {}
    storage = getattr(model, FLOAT_DTYPE_ATTR, None)  # set by round_float_tensors_
    resident = narrow_floats(_untied(resident, model), storage, grid_keys(model))
    size = _save_shard(resident, folder / shard[0], weight_map)
    adapter = adapter_for(model) if weights.pack_on_save else None
    for index, prefix in enumerate(prefixes):
        block, target = weights.blocks[index], folder / shard[index + 1]
        params = dict(block.named_parameters(prefix.rstrip("."), remove_duplicate=False))
        linkable = index in weights.written and set(block.state_dict(prefix=prefix)) == set(params)
        if linkable and adapter is None:
            _link_or_copy(weights.overlay_file(index), target)  # the written-back block as is
            weight_map.update(dict.fromkeys(params, target.name))
            size += sum(p.numel() * p.element_size() for p in params.values())
            continue
        with weights.holding(index):
            if adapter is not None:
                with parts_by_name():  # packed parts save under their own names
                    state = block.state_dict(prefix=prefix)
                packed, grids = _pack_block(block, prefix, adapter, state)
                state = narrow_floats(state, storage, grids)
                layout |= packed
            else:
                state = block.state_dict(prefix=prefix)
            size += _save_shard(state, target, weight_map)
    index_json = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index_json, indent=2))
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    return layout


def _pack_block(
    block: nn.Module, prefix: str, adapter, state: dict
) -> tuple[dict[str, dict], set[str]]:
    """Replace the block linears' float tensors in ``state`` by their packed codes; their
    layout entries, and the state keys of their grids. The model keeps its float modules (it
    is still offloaded)."""
    from channelwise.deploy.checkpoint import layout_entry
    from channelwise.deploy.packed import grid_keys, pack_linear

    layout, grids = {}, set()
    for name, module in adapter.block_linears(block).items():
        where = prefix + name
        packed = pack_linear(module, adapter.transposed_weights, where)
        for key in module.state_dict(prefix=f"{where}."):
            del state[key]
        state.update(packed.state_dict(prefix=f"{where}."))
        layout[where] = layout_entry(packed)
        grids |= {where + key for key in grid_keys(packed)}  # its keys start with "."
    return layout, grids


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _untied(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` without the second name of a shared tensor (a tied LM head), as transformers
    saves it."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        if value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        out[key] = value
    return out


def _save_shard(state: dict[str, torch.Tensor], path: Path, weight_map: dict[str, str]) -> int:
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, path.name))
    return sum(t.numel() * t.element_size() for t in tensors.values())
