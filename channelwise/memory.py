"""Peak memory a step adds above what the process (or GPU) held when it started.

On CUDA this is the allocator's own peak (``torch.cuda.max_memory_allocated``); on the CPU a
background thread samples the resident set size (``/proc/self/statm``) every few milliseconds, so
a spike shorter than the interval can be missed, and memory the allocator reuses from earlier frees
(still resident) does not raise RSS: on the CPU the figure is a lower bound.
"""

from __future__ import annotations

import os
import threading

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident set size in bytes (0 where ``/proc`` is unavailable)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def peak_resident_bytes() -> int:
    """The most resident memory this process has held since it started (``ru_maxrss``), in
    bytes; 0 where the platform does not say."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """``with PeakMemory(device) as peak: …`` then ``peak.added_mb``: the peak above the start."""

    def __init__(self, device: str | torch.device = "cpu", interval_s: float = 0.005) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.added_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def added_mb(self) -> float:
        return self.added_bytes / 2**20

    def sampled_mb(self) -> float:
        """The peak above the start seen so far (CPU: by the sampler thread), while running."""
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
        return max(0, self._peak - self._start) / 2**20

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = self._peak = resident_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, resident_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            peak = max(self._peak, resident_bytes())
        self.added_bytes = max(0, peak - self._start)
