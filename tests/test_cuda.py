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
from channelwise.compress import plan
from channelwise.errors import UnsupportedModelError
from channelwise.evaluate import perplexity
from channelwise.kvcache import chunked_perplexity, make_cache
from channelwise.kvcache.evaluate import cache_kwarg
from channelwise.recipe import load_recipe, preset_names

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
    try:  # the Vision Transformer presets refuse a language model (tested in test_families)
        plan(build_tiny_model("llama", **WIDE), preset)
    except UnsupportedModelError as exc:
        pytest.skip(str(exc))
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


KV_PRESETS = [name for name in preset_names() if load_recipe(name).kv_cache is not None]


@pytest.mark.parametrize("preset", KV_PRESETS)
def test_kv_cache_preset_gives_the_same_quality_on_cuda(
    preset: str, calibration_ids: torch.Tensor
) -> None:
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(4))
    fp = perplexity(build_tiny_model("llama", **WIDE), ids, progress=False)
    results = {}
    for device in ("cpu", "cuda"):
        model = build_tiny_model("llama", **WIDE).to(device)
        quantize(model, preset, calibration_ids.to(device), progress=False)
        results[device] = chunked_perplexity(model, ids, progress=False)
        if device == "cuda":
            cache = make_cache(model)
            with torch.no_grad():
                model(ids.cuda(), **{cache_kwarg(model): cache}, use_cache=True)
            held = [
                t
                for layer in cache.layers
                for seq in layer.sequences
                for enc in (seq.keys, seq.values)
                if enc is not None
                for t in enc.tensors.values()
            ]
            assert held and all(t.is_cuda for t in held), f"{preset}: cache left the GPU"
    cpu_cost, gpu_cost = results["cpu"] - fp, results["cuda"] - fp
    assert abs(gpu_cost - cpu_cost) <= SAME_QUALITY * abs(cpu_cost) + 1e-3 * fp, (
        f"{preset}: ppl {results['cuda']:.4f} on CUDA, {results['cpu']:.4f} on the CPU "
        f"(fp {fp:.4f})"
    )


@pytest.mark.parametrize(
    ("preset", "kernel"),
    [("rtn-w8a8", "aten::_int_mm"), ("rtn-w8a16", None), ("rtn-w4a16-g64", None)],
)
def test_packed_checkpoint_runs_on_cuda(preset, kernel, token_ids, calibration_ids, tmp_path):
    """A packed checkpoint loads onto the GPU and gives the fake-quant model's logits: W8A8
    through torch._int_mm (cuBLASLt int8), the weight-only ones through their de-quantized
    weights (no CUDA weight-only kernel here)."""
    from conftest import build_tiny_tokenizer

    from channelwise import load_model
    from channelwise.compress import save_quantized
    from channelwise.deploy import pack_model
    from channelwise.deploy.packed import use_kernels

    model = build_tiny_model("llama", **WIDE)
    quantize(model, preset, calibration_ids, progress=False)
    expected = logits(model, token_ids)
    quantization_error = relative_error(
        expected, logits(build_tiny_model("llama", **WIDE), token_ids)
    )
    pack_model(model)
    loaded, _ = load_model(
        save_quantized(model, build_tiny_tokenizer(), tmp_path / "out"), device="cuda"
    )
    before = use_kernels(True)
    try:
        with torch.profiler.profile() as profile:
            got = logits(loaded, token_ids.cuda()).cpu()
    finally:
        use_kernels(before)
    assert torch.isfinite(got).all()
    # W8A8 sums exactly in int32; per-token codes may round differently after a float sum in
    # another order (see test_deploy's kernel test): a fraction of the quantization error.
    bound = 0.5 * quantization_error if kernel else 1e-4
    assert relative_error(got, expected) < bound
    if kernel is not None:
        assert kernel in {event.key for event in profile.key_averages()}


@pytest.mark.parametrize("m", [1, 300])
def test_public_kernels_take_cuda_tensors(m):
    """The kernel API on CUDA tensors: the references' torch path (the extension is CPU code),
    W8A8 through torch._int_mm; no error from the CPU-only extension."""
    from channelwise import kernels

    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 128, generator=g).cuda()
    w8 = torch.randint(-127, 128, (64, 128), generator=g, dtype=torch.int8).cuda()
    scale = (torch.rand(64, generator=g) * 0.01).cuda()
    packed = torch.randint(0, 256, (64, 64), generator=g, dtype=torch.uint8).cuda()
    s4, z4 = torch.rand(64, 2, generator=g).cuda(), (torch.rand(64, 2, generator=g) * 15).cuda()
    w16 = torch.randn(64, 128, generator=g).half().cuda()
    pairs = [
        (kernels.w8a16_linear(x, w8, scale), kernels.w8a16_reference(x, w8, scale)),
        (
            kernels.w4a16_linear(x, packed, s4, z4, 64),
            kernels.w4a16_reference(x, packed, s4, z4, 64),
        ),
        (kernels.half_weight_linear(x, w16), kernels.half_weight_reference(x, w16)),
        (kernels.w8a8_linear(x, w8, scale), kernels.w8a8_reference(x, w8, scale)),
    ]
    for got, want in pairs:
        assert got.is_cuda
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
