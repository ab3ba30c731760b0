"""The peak-memory tracker sees a step's allocation and nothing from before it."""

import mmap
import time

import torch

from channelwise.memory import PeakMemory, resident_bytes


def test_resident_bytes_is_the_process_size() -> None:
    assert resident_bytes() > 10 * 2**20


def test_peak_memory_sees_a_short_lived_allocation() -> None:
    with PeakMemory("cpu", interval_s=0.001) as peak:
        # a fresh anonymous mapping, every page written: new resident memory whatever the
        # allocator holds (a torch tensor may reuse freed, still-resident heap pages, which
        # RSS cannot see — that made this test flaky in full-suite runs)
        block = mmap.mmap(-1, 64 * 2**20)
        block.write(b"\1" * (64 * 2**20))
        # hold it until the sampler thread has run (on a loaded runner it may wait its turn);
        # a sampler that never sees the allocation fails the assertion below after 10 s
        deadline = time.monotonic() + 10
        while peak.sampled_mb() < 40 and time.monotonic() < deadline:
            time.sleep(0.005)
        block.close()
    assert 40 <= peak.added_mb <= 200


def test_memory_held_before_the_step_is_not_counted() -> None:
    held = torch.ones(64 * 2**20 // 4)
    with PeakMemory("cpu") as peak:
        torch.ones(16).sum()
    assert peak.added_mb < 30
    del held
