"""Every preset compresses on CUDA as it does on the CPU (skipped where no GPU is present).

CI has no GPU; these run on a lent GPU machine. A device mismatch anywhere in a method (a
quantizer range, a shift, a rotation built on the CPU) fails here with the preset's name.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model
from helpers import logits, relative_error

from channelwise import quantize
from channelwise.recipe import preset_names

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# Every preset fits this shape: widths divisible by 128, k/v projections with 64 output rows.
WIDE = dict(hidden_size=128, intermediate_size=256)

# Float sums run in another order on the GPU, so a value on a grid boundary may round the other
# way and a search (AWQ's scales, OS+'s threshold) may pick a neighbouring candidate: the two
# compressed models differ, but by far less than the compression error itself. A bug (a step
# skipped, a range computed on the wrong rows) changes that error by much more.
SAME_QUALITY = 0.25


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("preset", preset_names())
def test_preset_gives_the_same_model_on_cuda_as_on_cpu(
    preset: str, token_ids: torch.Tensor, calibration_ids: torch.Tensor
) -> None:
    reference = logits(build_tiny_model("llama", **WIDE), token_ids)
    on_cpu = build_tiny_model("llama", **WIDE)
    quantize(on_cpu, preset, calibration_ids, progress=False)
    on_gpu = build_tiny_model("llama", **WIDE).cuda()
    quantize(on_gpu, preset, calibration_ids.cuda(), progress=False)

    stray = [n for n, t in [*on_gpu.named_parameters(), *on_gpu.named_buffers()] if not t.is_cuda]
    assert not stray, f"{preset}: left on the CPU: {stray[:5]}"
    got = logits(on_gpu, token_ids.cuda()).cpu()
    assert torch.isfinite(got).all()
    cpu_error = relative_error(logits(on_cpu, token_ids), reference)
    gpu_error = relative_error(got, reference)
    assert abs(gpu_error - cpu_error) <= SAME_QUALITY * cpu_error + 1e-4, (
        f"{preset}: error vs float {gpu_error:.4f} on CUDA, {cpu_error:.4f} on the CPU"
    )
