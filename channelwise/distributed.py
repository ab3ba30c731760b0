"""Calibration across processes with ``torch.distributed`` (gloo on CPU, nccl on CUDA).

Launched with ``torchrun --nproc_per_node N``, every process loads the same model and the same
calibration samples; :func:`channelwise.compress.quantize` then gives each process a share of
the calibration *batches* (round robin, so each process batches its share exactly as one process
would), and the block-wise engine works on every block in step on all processes:

- statistics a method streams over the calibration tokens are reduced across processes (GPTQ's
  Hessian sums and token counts, SmoothQuant's per-channel abs-max; static activation ranges
  are computed from the rows of every process, gathered);
- each linear is quantized once, by one process (``owner``: linears are dealt round robin), and
  broadcast to the others, weight and grid;
- a block's outputs stay on the process that computed them: they are the next block's inputs.

The result equals one process's within float tolerance: only the order in which per-batch float64
sums are added differs. Only the methods that declare ``distributed = True`` run this way; others
are refused with the reason before any work. An error on one process (a Hessian that is not
positive definite, NaN activations) is raised on every process, so none waits forever.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from channelwise.errors import ChannelwiseError, DataSourceError, DeviceError

T = TypeVar("T")


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among the calibration processes (the default torch process group)."""

    rank: int
    size: int

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the process that prints and writes outputs."""
        return self.rank == 0

    @property
    def _device(self) -> torch.device:
        """Where collectives take tensors: CPU for gloo, this process's GPU for nccl."""
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # --- calibration data ----------------------------------------------------------------

    def shard(self, calibration: torch.Tensor, batch_size: int) -> torch.Tensor:
        """This process's calibration samples: batches ``rank, rank + size, …`` of
        ``batch_size`` samples each. Every process must pass the same ``calibration``."""
        self.check_same(calibration)
        batches = list(torch.split(calibration, batch_size))
        if len(batches) < self.size:
            raise DataSourceError(
                f"{calibration.shape[0]} calibration samples in batches of {batch_size} give "
                f"{len(batches)} batch{'es' if len(batches) != 1 else ''}, fewer than the "
                f"{self.size} processes; use more samples or a smaller batch size"
            )
        return torch.cat(batches[self.rank :: self.size])

    def check_same(self, calibration: torch.Tensor) -> None:
        """Refuse calibration data that differs between processes (each must pass all of it)."""
        data = calibration.detach().cpu().contiguous()
        digest = hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()
        mine = (tuple(data.shape), str(data.dtype), digest)
        if any(other != mine for other in self.all_gather_objects(mine)):
            raise DataSourceError(
                "the processes were given different calibration data; every process must load "
                "the same samples (quantize shards them itself)"
            )

    # --- collectives ---------------------------------------------------------------------

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` in place across processes (``op``: sum, max or min); returns it."""
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        moved = tensor.detach().to(self._device)
        dist.all_reduce(moved, op=ops[op])
        if moved.data_ptr() != tensor.data_ptr():
            tensor.copy_(moved)
        return tensor

    def all_gather_objects(self, value: Any) -> list[Any]:
        """Every process's ``value`` (small, picklable; our own processes only), in rank order."""
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def gather_batches(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every process's per-batch tensors (rows ``(n_b, C)``, this process's share as
        :meth:`shard` dealt it) on every process, in the order of the undivided calibration
        set: rows computed from them come out as one process would have them."""
        mine = torch.cat(batches) if batches else torch.empty(0)
        sizes = self.all_gather_objects([int(b.shape[0]) for b in batches])
        width = mine.shape[1:]
        padded = torch.zeros(
            max(sum(s) for s in sizes), *width, dtype=mine.dtype, device=self._device
        )
        padded[: mine.shape[0]] = mine
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        per_rank = [
            list(torch.split(part[: sum(n)], n)) for part, n in zip(parts, sizes, strict=True)
        ]
        ordered = []
        for index in range(sum(len(n) for n in sizes)):
            ordered.append(per_rank[index % self.size][index // self.size].to(mine.device))
        return ordered

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process."""
        value = torch.tensor([1.0 if flag else 0.0])
        return bool(self.all_reduce_(value, "max").item())

    def owner(self, index: int) -> int:
        """The process that does item ``index`` of a list dealt round robin."""
        return index % self.size

    def broadcast_(self, tensor: torch.Tensor, owner: int) -> None:
        """Overwrite ``tensor`` (same shape on every process) with ``owner``'s, in place."""
        moved = tensor.detach().to(self._device)
        dist.broadcast(moved, src=owner)
        if moved.data_ptr() != tensor.data_ptr():
            with torch.no_grad():
                tensor.copy_(moved)

    def broadcast_object(self, value: Any, owner: int) -> Any:
        """``owner``'s ``value`` (small, picklable) on every process."""
        box = [value]
        dist.broadcast_object_list(box, src=owner)
        return box[0]

    def run_owned(self, jobs: list[Callable[[], T]]) -> list[T | None]:
        """Run the jobs this process owns (job ``i`` belongs to :meth:`owner` ``(i)``); the
        others' slots are ``None``. A :class:`ChannelwiseError` on any process is raised on
        every process (with the owner's message) once all have finished their jobs."""
        results: list[T | None] = [None] * len(jobs)
        error: str | None = None
        for index, job in enumerate(jobs):
            if self.owner(index) != self.rank or error is not None:
                continue
            try:
                results[index] = job()
            except ChannelwiseError as exc:
                error = f"{type(exc).__name__}\0{exc}"
        self.raise_if_any(error)
        return results

    def raise_if_any(self, error: str | None) -> None:
        """Raise on every process the first error any process reports (``"Kind\\0message"``)."""
        errors = [e for e in self.all_gather_objects(error) if e is not None]
        if errors:
            kind, message = errors[0].split("\0", 1)
            cls = {c.__name__: c for c in _error_classes()}.get(kind, ChannelwiseError)
            raise cls(message)


def _error_classes() -> list[type[ChannelwiseError]]:
    seen, todo = [], [ChannelwiseError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


def current_group() -> ProcessGroup | None:
    """The initialized default process group when it has more than one process, else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    size = dist.get_world_size()
    return ProcessGroup(dist.get_rank(), size) if size > 1 else None


def launched_world_size() -> int:
    """How many processes ``torchrun`` started (``WORLD_SIZE``; 1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


@contextmanager
def process_group(device: torch.device) -> Iterator[ProcessGroup | None]:
    """Join the processes ``torchrun`` started, for the duration of the block: gloo on CPU,
    nccl on CUDA (each process on GPU ``LOCAL_RANK``). Yields the group, or ``None`` when
    launched as one process. Returns with the device this process computes on set by
    :func:`process_device`."""
    if launched_world_size() <= 1 or dist.is_initialized():
        yield current_group()
        return
    if not dist.is_available():
        raise DeviceError("this build of torch has no torch.distributed; run one process")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(process_device(device))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        yield current_group()
    finally:
        dist.destroy_process_group()


def process_device(device: torch.device) -> torch.device:
    """The device this process computes on: across processes, CUDA means GPU ``LOCAL_RANK``."""
    if launched_world_size() <= 1 or device.type != "cuda":
        return device
    if device.index is not None:
        raise DeviceError(
            f"--device {device}: across processes each takes its own GPU (LOCAL_RANK); "
            "pass --device cuda"
        )
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise DeviceError(
            f"process {local} has no GPU: {torch.cuda.device_count()} visible; start at most "
            "that many processes per node"
        )
    return torch.device("cuda", local)
