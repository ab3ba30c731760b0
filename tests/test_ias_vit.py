"""I&S-ViT: the SULQ softmax quantizer against a plain reference, straight-through gradients,
block reconstruction, and the ``ias_vit`` method on tiny random DINOv2 models."""

from __future__ import annotations

import math
from copy import deepcopy

import pytest
import torch
from helpers import ATTENTION4, STATIC4, WEIGHTS4

from channelwise.compress import plan, quantize
from channelwise.errors import NonFiniteError, RecipeError, UnsupportedModelError
from channelwise.quant import QuantSpec, compute_qparams, fake_quantize
from channelwise.quant.attention import ShiftLog2Quantizer, attention_quantizers, shift_uniform_log2
from channelwise.quant.granularity import PerRow
from channelwise.quant.grid import weight_grid
from channelwise.recipe import Recipe
from channelwise.reconstruct import block_loss, linear_parameters, reconstruct_block, weight_grids


def _sulq_reference(x: torch.Tensor, bits: int, eta: float, lo: float, hi: float) -> torch.Tensor:
    """Element by element, as the official code computes it (with 2^b − 1 levels)."""
    levels = 2**bits - 1
    step = (hi - lo) / levels if hi > lo else 1.0
    out = torch.empty_like(x)
    for i, value in enumerate(x.reshape(-1).tolist()):
        y = math.log2(max(value, 0.0) + eta)
        q = min(max(round((y - lo) / step), 0), levels)
        out.view(-1)[i] = 2.0 ** round(q * step + lo) - eta
    return out


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_sulq_matches_a_plain_reference_on_random_and_adversarial_probabilities(bits):
    generator = torch.Generator().manual_seed(bits)
    probs = torch.softmax(4 * torch.randn(6, 40, generator=generator), dim=-1)
    probs[0] = 0.0  # all zero
    probs[1] = 1.0 / 40  # constant
    probs[2, :] = 1e-30  # one-hot with the rest far below every level
    probs[2, 0] = 1.0
    for eta in (0.001, 0.05, 1.0):
        y = torch.log2(probs + eta)
        lo, hi = y.min().item(), y.max().item()
        got = shift_uniform_log2(probs, bits, eta, lo, hi)
        torch.testing.assert_close(got, _sulq_reference(probs, bits, eta, lo, hi))
    constant = torch.full((4, 4), 0.25)  # hi == lo: one level, no division by zero
    y = math.log2(0.25 + 0.01)
    got = shift_uniform_log2(constant, bits, 0.01, y, y)
    torch.testing.assert_close(got, _sulq_reference(constant, bits, 0.01, y, y))


def test_sulq_refuses_nan_calibrates_by_error_and_covers_small_probabilities():
    with pytest.raises(NonFiniteError):
        shift_uniform_log2(torch.tensor([0.5, float("nan")]), 4, 0.01, -6.0, 0.0)
    quantizer = ShiftLog2Quantizer(4)
    with pytest.raises(NonFiniteError):
        quantizer.calibrate([torch.tensor([0.5, float("inf")])])
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(64, 64, generator=generator), dim=-1)
    assert torch.equal(quantizer(probs), probs), "uncalibrated: float"
    quantizer.calibrate([probs])
    assert quantizer.eta in quantizer.etas
    error = (quantizer(probs) - probs).square().mean()
    for eta in quantizer.etas:  # the chosen shift is the best candidate
        y = torch.log2(probs + eta)
        other = shift_uniform_log2(probs, 4, eta, y.min().item(), y.max().item())
        assert error <= (other - probs).square().mean() + 1e-12
    assert quantizer(probs).unique().numel() > 3, "SULQ uses several levels"


def test_fake_quantization_passes_gradients_straight_through():
    spec = QuantSpec(4, False, PerRow())
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1)) * 3
    x[0, 3] = 40.0  # an outlier
    qparams = compute_qparams(x, spec)
    leaf = x.clone().requires_grad_(True)
    out = fake_quantize(leaf, spec, qparams)
    torch.testing.assert_close(out.detach(), fake_quantize(x, spec, qparams))
    (out * torch.arange(16.0)).sum().backward()
    torch.testing.assert_close(leaf.grad, torch.arange(16.0).expand(5, 16))
    probs = torch.softmax(torch.randn(3, 8), -1).requires_grad_(True)
    shift_uniform_log2(probs, 4, 0.01, -6.7, 0.0).sum().backward()
    torch.testing.assert_close(probs.grad, torch.ones_like(probs))


def _block_data(model, n: int = 16):
    from channelwise.adapters import adapter_for
    from channelwise.engine import capture_block_inputs

    adapter = adapter_for(model)
    pixels = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    inputs, kwargs = capture_block_inputs(model, adapter, pixels, batch_size=n)
    return adapter, inputs[0], kwargs[0]


def test_reconstruction_lowers_the_block_loss_and_trains_only_the_linears(tiny_dinov2):
    adapter, inputs, kwargs = _block_data(tiny_dinov2)
    block = adapter.block_list(tiny_dinov2)[0]
    with torch.no_grad():
        targets = block(inputs, **kwargs)
    targets = targets[0] if isinstance(targets, tuple) else targets
    frozen = {n: p.clone() for n, p in block.named_parameters() if "norm" in n or "scale" in n}
    linears = list(adapter.block_linears(block).values())
    spec = QuantSpec(3, False, PerRow())
    grids = [compute_qparams(m.weight.detach(), spec) for m in linears]
    with weight_grids(linears, spec, grids):
        assert torch.equal(
            linears[0].weight,
            fake_quantize(linears[0].parametrizations.weight.original.detach(), spec, grids[0]),
        )  # noqa: E501
        result = reconstruct_block(block, linear_parameters(linears), inputs, kwargs, targets,
                                   iters=60, batch_size=8, lr=3e-3)  # fmt: skip
        assert result.loss_after < 0.7 * result.loss_before, result
        assert result.loss_after == pytest.approx(block_loss(block, inputs, kwargs, targets, 8))
    assert not torch.equal(
        linears[0].weight, fake_quantize(linears[0].weight.detach(), spec, grids[0])
    )
    for name, param in block.named_parameters():
        assert param.requires_grad, f"{name}: requires_grad not restored"
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"{name} was trained"


def test_reconstruction_refuses_nan_inputs_and_divergence_with_quantizer_checks_off_inside(
    tiny_dinov2,
):
    """The training steps skip the quantizers' per-activation NaN check (the loss is checked
    every step); a NaN calibration input is still refused by the checked pass before training,
    a diverging training by the loss check, and the checks are on again afterwards."""
    from channelwise.quant.activation import InputQuantizer, install_input_quantizer
    from channelwise.quant.core import loss_checked_training

    adapter, inputs, kwargs = _block_data(tiny_dinov2)
    block = adapter.block_list(tiny_dinov2)[0]
    linears = list(adapter.block_linears(block).values())
    spec = QuantSpec(4, False, PerRow())
    for module in linears:
        install_input_quantizer(module, InputQuantizer(spec))
    targets = torch.zeros_like(inputs)
    train = dict(iters=2, batch_size=8, lr=1e-3)
    bad = inputs.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="input to quantizer"):
        reconstruct_block(block, linear_parameters(linears), bad, kwargs, targets, **train)
    with pytest.raises(NonFiniteError, match="diverged"):
        reconstruct_block(block, linear_parameters(linears), inputs, kwargs, targets,
                          iters=5, batch_size=8, lr=1e30)  # fmt: skip
    with pytest.raises(NonFiniteError):  # checks back on after the raise inside
        fake_quantize(torch.tensor([[float("nan"), 1.0]]), spec)
    with loss_checked_training():
        assert fake_quantize(torch.tensor([[float("nan"), 1.0]]), spec).isnan().any()


def _ias(**args) -> Recipe:
    return Recipe.from_dict({
        "name": "ias-test", "weights": WEIGHTS4, "activations": STATIC4, "attention": ATTENTION4,
        "steps": [{"method": "ias_vit", "args": {"batch_size": 8, "lr": 2e-3, **args}}],
    })  # fmt: skip


def test_ias_vit_rounds_every_weight_and_reconstruction_beats_no_reconstruction(tiny_dinov2):
    pixels = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = tiny_dinov2(pixel_values=pixels).last_hidden_state
    errors = {}
    for name, args in (("quantizers only", {"reconstruct": False}), ("ias", {"iters": 100})):
        model = deepcopy(tiny_dinov2)
        result = quantize(model, _ias(**args), pixels, progress=False)
        method = result.methods[0]
        for layer in model.encoder.layer:
            probs = attention_quantizers(layer.attention).probs
            assert isinstance(probs, ShiftLog2Quantizer) and probs.calibrated
            for linear in (layer.attention.q_proj, layer.mlp.fc1, layer.mlp.fc2):
                grid = weight_grid(linear)
                assert grid is not None
                torch.testing.assert_close(
                    linear.weight, fake_quantize(linear.weight, grid.spec, grid.qparams)
                )
        with torch.no_grad():
            got = model(pixel_values=pixels).last_hidden_state
        errors[name] = ((got - expected).norm() / expected.norm()).item()
        if args.get("iters"):
            for (block, stage), loss in method.losses.items():  # the quantized weights' stage
                assert stage == 1 or loss.loss_after < 0.9 * loss.loss_before, (block, loss)
            assert {stage for _, stage in method.losses} == {1, 3}
        else:
            assert method.losses == {}
    assert errors["ias"] < 0.8 * errors["quantizers only"], errors


def test_ias_vit_recipe_errors_are_clear(tiny_dinov2, make_tiny_model):
    with pytest.raises(RecipeError, match="last step"):
        plan(tiny_dinov2, Recipe.from_dict({
            "weights": WEIGHTS4, "activations": STATIC4,
            "steps": [{"method": "ias_vit"}, {"method": "rtn"}],
        }))  # fmt: skip
    with pytest.raises(RecipeError, match="static asymmetric"):
        plan(tiny_dinov2, Recipe.from_dict({
            "weights": WEIGHTS4, "activations": {**STATIC4, "dynamic": True},
            "steps": [{"method": "ias_vit"}],
        }))  # fmt: skip
    with pytest.raises(RecipeError, match="SULQ"):
        plan(tiny_dinov2, Recipe.from_dict({
            "weights": WEIGHTS4, "activations": STATIC4,
            "attention": {**ATTENTION4, "probs": STATIC4},
            "steps": [{"method": "ias_vit"}],
        }))  # fmt: skip
    with pytest.raises(RecipeError, match="weights"):
        plan(
            tiny_dinov2,
            Recipe.from_dict({"activations": STATIC4, "steps": [{"method": "ias_vit"}]}),
        )
    with pytest.raises(RecipeError, match="iters"):
        plan(tiny_dinov2, _ias(iters=-1))
    llm = make_tiny_model("llama")
    with pytest.raises(UnsupportedModelError, match="Vision Transformer"):
        plan(llm, _ias())


@pytest.mark.parametrize("preset", ["repq-vit-w4a4", "ias"])
def test_static_attention_ranges_save_and_load_back_bit_identically(tiny_dinov2, tmp_path, preset):
    """log√2 (RepQ-ViT) and SULQ (I&S-ViT) softmax quantizers and static q/k/v ranges are
    saved with the model, fake-quant and packed; a folder missing them is refused."""
    import json

    from channelwise.compress import save_quantized
    from channelwise.deploy import pack_model
    from channelwise.deploy.packed import use_kernels
    from channelwise.errors import CheckpointError
    from channelwise.state import ATTENTION_RANGES_FILE, MARKER_FILE
    from channelwise.vision import load_vision_model

    pixels = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    recipe = _ias(iters=3) if preset == "ias" else preset
    quantize(tiny_dinov2, recipe, pixels, progress=False)
    with torch.no_grad():
        expected = tiny_dinov2(pixel_values=pixels).last_hidden_state
    fake = load_vision_model(save_quantized(tiny_dinov2, None, tmp_path / "fake"), "cpu")
    with torch.no_grad():
        assert torch.equal(fake(pixel_values=pixels).last_hidden_state, expected)
    kind = ShiftLog2Quantizer if preset == "ias" else type(attention_quantizers(
        tiny_dinov2.encoder.layer[0].attention).probs)  # fmt: skip
    assert isinstance(attention_quantizers(fake.encoder.layer[1].attention).probs, kind)
    pack_model(tiny_dinov2)
    before = use_kernels(False)
    try:
        packed = load_vision_model(save_quantized(tiny_dinov2, None, tmp_path / "packed"), "cpu")
        with torch.no_grad():
            assert torch.equal(packed(pixel_values=pixels).last_hidden_state, expected)
    finally:
        use_kernels(before)
    (tmp_path / "fake" / ATTENTION_RANGES_FILE).unlink()
    with pytest.raises(CheckpointError, match="cannot be restored"):
        load_vision_model(tmp_path / "fake", "cpu")
    marker_path = tmp_path / "packed" / MARKER_FILE
    marker = json.loads(marker_path.read_text())
    del marker["attention_quantizers"]["encoder.layer.1.attention"]
    marker_path.write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match="missing the static attention ranges"):
        load_vision_model(tmp_path / "packed", "cpu")
