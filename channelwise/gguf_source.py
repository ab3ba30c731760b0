"""A GGUF file as a float32 safetensors checkpoint, converted one tensor at a time.

transformers' GGUF loading (``from_pretrained(gguf_file=…)``) dequantizes the whole model into
memory, so converting a 7B GGUF that way needs several times the model's float32 size. Here the
file is memory-mapped (``gguf.GGUFReader``), each tensor is dequantized on its own
(``gguf.quants.dequantize``), renamed and un-permuted by transformers' own per-architecture name
map and tensor processors (the same ones its loader uses, so the result is what it builds), and
written as soon as its shard is complete: one shard per decoder block, one for the rest. Peak
memory is about one block or the tensors outside the blocks (GGUF files store those first or
last, and the blocks in order). The config and tokenizer come
from transformers' GGUF metadata readers. Every tensor's shape is checked against the model the
config describes, and a tensor the model needs that the file lacks is an error (a head tied to
the embedding excepted), never a random initialisation.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from channelwise.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"


def convert_gguf(gguf_path: Path, folder: Path) -> None:
    """Write ``gguf_path`` into ``folder`` (existing, empty) as a sharded float32 checkpoint with
    its config, generation config and tokenizer."""
    from accelerate import init_empty_weights
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    from channelwise.models import ModelNotFoundError

    parent, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(parent, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(parent, gguf_file=name)
        parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=False)
        reader = GGUFReader(str(gguf_path))
        architecture = str(reader.fields["general.architecture"].contents())
    except (OSError, ValueError, KeyError, struct.error) as exc:  # struct: a cut header
        raise ModelNotFoundError(f"could not read GGUF file {gguf_path}: {exc}") from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # accelerate's meta parameters are not tied yet
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    gguf_to_hf = get_gguf_hf_weights_map(model, processor)
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    tied = _tied_keys(model)
    shards = _Shards(folder, expected, _block_prefixes(model), tied)
    stash: dict = {"tensors": {}, **{k: v for k, v in parsed.items() if k != "tensors"}}
    for tensor in reader.tensors:
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=gguf_to_hf,
            parsed_parameters=stash,
        )  # fmt: skip
        found = dict(stash["tensors"])  # processors that split a tensor (MoE experts) stash
        stash["tensors"].clear()
        if result.name in gguf_to_hf:
            found[gguf_to_hf[result.name]] = torch.from_numpy(result.weights.copy())
        for key, value in found.items():
            shards.add(key, value.to(torch.float32), gguf_path)
    shards.finish(gguf_path)
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _block_prefixes(model: torch.nn.Module) -> list[str]:
    from channelwise.adapters import adapter_for

    adapter = adapter_for(model)
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(block)] + "." for block in adapter.block_list(model)]


def _tied_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys that name a parameter another key names first (a tied LM head)."""
    seen: set[int] = set()
    tied = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(key)
        seen.add(id(tensor))
    return tied


class _Shards:
    """Tensors routed to one shard per block and one for everything else (embeddings, final
    norm, head), each written as soon as it is complete; ``tied`` keys are never written."""

    def __init__(
        self, folder: Path, expected: dict[str, tuple], prefixes: list[str], tied: set[str]
    ) -> None:
        self.folder = folder
        self.expected = expected
        self.prefixes = prefixes
        self.tied = tied
        total = len(prefixes) + 1
        self.names = [f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]
        self.wanted: list[set[str]] = [set() for _ in self.names]
        for key in set(expected) - tied:
            self.wanted[self.shard_of(key)].add(key)
        self.pending: dict[int, dict[str, torch.Tensor]] = {}
        self.weight_map: dict[str, str] = {}
        self.size = 0

    def shard_of(self, key: str) -> int:
        for index, prefix in enumerate(self.prefixes):
            if key.startswith(prefix):
                return index + 1
        return 0

    def add(self, key: str, tensor: torch.Tensor, source: Path) -> None:
        if key not in self.expected or key in self.tied:
            return  # transformers' loader ignores these too (e.g. precomputed rope tables)
        if tuple(tensor.shape) != self.expected[key]:
            raise CheckpointError(
                f"{source}: its tensors do not fit the model transformers builds from its "
                f"metadata: {key} is {tuple(tensor.shape)}, the model expects "
                f"{self.expected[key]} (transformers reads no head_dim for some architectures, "
                "e.g. Qwen3, and assumes the default)"
            )
        index = self.shard_of(key)
        self.pending.setdefault(index, {})[key] = tensor
        if set(self.pending[index]) == self.wanted[index]:
            self._write(index)

    def finish(self, source: Path) -> None:
        written = set(self.weight_map) | {k for part in self.pending.values() for k in part}
        missing = sorted(set(self.expected) - written - self.tied)
        if missing:
            raise CheckpointError(
                f"{source}: {len(missing)} tensor(s) the model needs are not in the file "
                f"(first: {missing[0]}); refusing to fill them with random values"
            )
        for index in sorted(self.pending):
            self._write(index)
        index_json = {"metadata": {"total_size": self.size}, "weight_map": self.weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index_json, indent=2, sort_keys=True))

    def _write(self, index: int) -> None:
        tensors = {k: v.contiguous() for k, v in self.pending.pop(index).items()}
        save_file(tensors, str(self.folder / self.names[index]), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(tensors, self.names[index]))
        self.size += sum(t.numel() * t.element_size() for t in tensors.values())
