"""Run under ``torchrun --nproc_per_node N``: quantize tiny models across the processes.

Usage: ``torchrun --nproc_per_node 2 tests/distributed_worker.py OUT``. For each case of
:data:`CASES` every process quantizes the same tiny model on the same calibration ids; rank 0
writes the result's tensors (state dict and static activation ranges) to ``OUT/<case>.safetensors``,
and every rank writes the one-line errors it met to ``OUT/errors-<rank>.json``. The test compares
them with one process (``tests/test_distributed.py``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from channelwise.compress import quantize
from channelwise.errors import ChannelwiseError
from channelwise.tiny import VOCAB, WIDE, build_tiny_model

#: ``case: (family, recipe)``; the calibration set is :func:`calibration_ids`.
CASES = {
    "llama-gptq": ("llama", "gptq-w4a16-g64"),
    "llama-gptq-static": ("llama", "static-gptq"),
    "gpt2-smoothquant": ("gpt2", "smoothquant-w8a8"),
    "llama-quarot": ("llama", "quarot-w4a4"),
}

#: A recipe with static per-tensor activation ranges (gathered from every process) and GPTQ
#: without true-sequential stages (one Hessian pass per block, linears dealt over processes).
STATIC_GPTQ = """
name: static-gptq
weights: {bits: 4, symmetric: false, granularity: group, group_size: 64}
activations: {bits: 8, symmetric: false, granularity: tensor, dynamic: false, range: mse}
steps:
  - method: gptq
    args: {true_sequential: false}
"""

#: ``case: (family, recipe, calibration)`` that must be refused on every process.
REFUSED = {
    "awq": ("llama", "awq-w4a16-g64", None),
    "few-batches": ("llama", "gptq-w4a16-g64", 2),  # 2 samples: one batch for 2 processes
    "different-data": ("llama", "gptq-w4a16-g64", "rank"),
}

BATCH_SIZE = 2


def calibration_ids(samples: int = 10, seed: int = 3) -> torch.Tensor:
    """Ten seeded sequences of 24 ids: five batches of two, dealt 3/2 over two processes."""
    return torch.randint(0, VOCAB, (samples, 24), generator=torch.Generator().manual_seed(seed))


def recipe_for(name: str, folder: Path):
    if name != "static-gptq":
        return name
    path = folder / "static-gptq.yaml"
    path.write_text(STATIC_GPTQ)
    return path


def quantized_tensors(family: str, recipe, calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors a quantized tiny model ends with: weights and static input ranges."""
    from channelwise.compress import _static_qparams

    model = build_tiny_model(family, **WIDE[family])
    quantize(model, recipe, calibration, batch_size=BATCH_SIZE, progress=False)
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"input_range.{k}": v for k, v in _static_qparams(model).items()})
    return tensors


def main(out: Path) -> None:
    import channelwise.compress as compress

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    errors: dict[str, str] = {}
    shares: list[int] = []
    run_blockwise = compress.run_blockwise

    def recording(model, adapter, input_ids, *args, **kwargs):
        shares.append(int(input_ids.shape[0]))
        return run_blockwise(model, adapter, input_ids, *args, **kwargs)

    compress.run_blockwise = recording
    own = out / f"rank-{rank}"  # a recipe file each: one rank rewriting it as another reads it
    own.mkdir(exist_ok=True)
    for case, (family, recipe) in CASES.items():
        tensors = quantized_tensors(family, recipe_for(recipe, own), calibration_ids())
        if rank == 0:
            save_file(tensors, str(out / f"{case}.safetensors"))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, shares[0])
    if rank == 0:
        (out / "shares.json").write_text(json.dumps(dict(enumerate(gathered))))
    for case, (family, recipe, data) in REFUSED.items():
        calibration = (
            calibration_ids(seed=3 + rank)
            if data == "rank"
            else calibration_ids(data)
            if data
            else calibration_ids()
        )
        try:
            quantized_tensors(family, recipe, calibration)
        except ChannelwiseError as exc:
            errors[case] = f"{type(exc).__name__}: {exc}"
    (out / f"errors-{rank}.json").write_text(json.dumps(errors))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
