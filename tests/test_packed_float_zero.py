"""Packed grids with a float minimum (``zero_point: float``, values ``q·s + m``; GGUF's Q4_1).

The packed codes, scales and float32 minimums must give back the fake-quantized tensor bit for
bit, survive a save/reload, and run the W4A16 kernel (as ``(q + m/s)·s``) within float rounding.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model, build_tiny_tokenizer
from helpers import logits, relative_error
from safetensors.torch import load_file, save_file

from channelwise import load_model, quantize
from channelwise.compress import save_quantized
from channelwise.deploy import PackedLinear, pack_model
from channelwise.deploy.packed import PackedCodes, use_kernels
from channelwise.errors import CheckpointError
from channelwise.quant import PerGroup, PerRow, QuantSpec, compute_qparams, fake_quantize
from channelwise.quant import quantize as quantize_codes
from channelwise.recipe import Recipe, load_recipe


@pytest.fixture(autouse=True)
def reference_path():
    before = use_kernels(False)
    yield
    use_kernels(before)


def float_zero_spec(bits: int, granularity, scale_dtype: str = "float16") -> QuantSpec:
    return QuantSpec(bits, False, granularity, scale_dtype=scale_dtype, zero_point="float")


def adversarial(rows: int, cols: int) -> torch.Tensor:
    """Random rows plus an all-zero row, a constant row, a positive-only row and huge values."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    w[0] = 0.0
    w[1] = 0.37
    w[2] = w[2].abs() + 3.0  # minimum far from zero: an integer zero point could not hold it
    w[3, ::2] = 6.0e4  # near float16's largest value
    w[3, 1::2] = -6.0e4
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("granularity", [PerGroup(32), PerRow(), PerGroup(6)])
@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_float_minimum_codes_reproduce_fake_quant_exactly(bits, granularity, scale_dtype):
    w = adversarial(7, 96)
    spec = float_zero_spec(bits, granularity, scale_dtype)
    qparams = compute_qparams(w, spec)
    packed = PackedCodes(*w.shape, spec)
    packed.load_codes(quantize_codes(w, qparams, spec), qparams)
    assert packed.zero.dtype == torch.float32
    assert torch.equal(packed.zero, qparams.zero_point)  # the minimum itself, not rounded to int
    assert torch.equal(packed.dequantized(), fake_quantize(w, spec))
    assert torch.equal(packed.codes(), quantize_codes(w, qparams, spec).to(torch.int16))


def test_integer_zero_points_stay_uint8():
    spec = QuantSpec(4, False, PerGroup(32))
    assert PackedCodes(4, 64, spec).zero.dtype == torch.uint8


def q4_1_model(calibration_ids, **overrides):
    model = build_tiny_model("llama", **overrides)
    quantize(model, load_recipe("rtn-w4a16-q4_1"), calibration_ids, progress=False)
    return model


def test_q4_1_model_packs_to_identical_logits_and_reloads(calibration_ids, token_ids, tmp_path):
    model = q4_1_model(calibration_ids)
    expected = logits(model, token_ids)
    pack_model(model)
    linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(linears) == 14 and all(m.zero.dtype == torch.float32 for m in linears)
    assert torch.equal(logits(model, token_ids), expected)
    folder = save_quantized(model, build_tiny_tokenizer(), tmp_path / "out")
    stored = load_file(str(folder / "model.safetensors"))
    assert stored["model.layers.0.mlp.up_proj.zero"].dtype == torch.float32
    loaded, _ = load_model(folder, device="cpu")
    assert torch.equal(logits(loaded, token_ids), expected)


def test_float_minimum_stored_as_integers_is_refused(calibration_ids, tmp_path):
    model = q4_1_model(calibration_ids)
    pack_model(model)
    folder = save_quantized(model, build_tiny_tokenizer(), tmp_path / "out")
    file = folder / "model.safetensors"
    state = load_file(str(file))
    state["model.layers.0.mlp.up_proj.zero"] = state["model.layers.0.mlp.up_proj.zero"].byte()
    save_file(state, str(file))
    with pytest.raises(CheckpointError, match="up_proj.zero"):
        load_model(folder, device="cpu")


@pytest.mark.parametrize("tokens", [1, 5, 300])
def test_w4a16_kernel_takes_a_float_minimum_within_float_rounding(
    calibration_ids, tokens, monkeypatch
):
    from channelwise import kernels

    model = q4_1_model(calibration_ids)
    ids = torch.randint(0, 128, (1, tokens), generator=torch.Generator().manual_seed(5))
    expected = logits(model, ids)
    quantization_error = relative_error(expected, logits(build_tiny_model("llama"), ids))
    pack_model(model)
    use_kernels(True)
    calls = []
    kernel = kernels.w4a16_linear
    monkeypatch.setattr(kernels, "w4a16_linear", lambda *a: calls.append(1) or kernel(*a))
    got = logits(model, ids)
    assert len(calls) == 14
    # (q + m/s)·s differs from q·s + m by one rounding of m, the kernel's sum by its order:
    # ~1e-7 relative per linear. A misread minimum (e.g. as an integer offset) would be off by
    # the order of the whole quantization error.
    assert relative_error(got, expected) < 1e-5 < 0.01 * quantization_error


def test_q4_1_preset_differs_from_the_integer_zero_point_grid(calibration_ids, token_ids):
    """The float minimum is a different grid: same codes range, exact [lo, hi] per group."""
    recipe = Recipe.from_dict(
        {
            "name": "int-zero",
            "weights": {"bits": 4, "symmetric": False, "granularity": "group", "group_size": 32},
        }
    )
    integer = build_tiny_model("llama")
    quantize(integer, recipe, calibration_ids, progress=False)
    floating = q4_1_model(calibration_ids)
    assert not torch.equal(logits(integer, token_ids), logits(floating, token_ids))
