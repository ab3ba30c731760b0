"""RepQuant: the learnable dual-clipping quantizer against a plain reference, its gradients, and
the ``repquant`` method on tiny random DINOv2 models (save and reload included)."""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch
from helpers import ATTENTION4, STATIC4, WEIGHTS4

from channelwise.compress import plan, quantize, save_quantized
from channelwise.errors import NonFiniteError, QuantConfigError, RecipeError, UnsupportedModelError
from channelwise.quant import PerColumn, QuantSpec, compute_qparams, fake_quantize
from channelwise.quant.activation import input_quantizer
from channelwise.quant.attention import LogSqrt2Quantizer, attention_quantizers
from channelwise.quant.clipping import ClippingQuantizer, fake_quantize_between
from channelwise.quant.core import qparams_from_range
from channelwise.quant.granularity import PerTensor
from channelwise.quant.grid import weight_grid
from channelwise.recipe import Recipe
from channelwise.vision import load_vision_model


def _reference(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int):
    """Channel by channel and element by element, in float32 scalars."""
    levels = 2**bits - 1
    out = torch.empty_like(x)
    for c in range(x.shape[-1]):
        lo = torch.clamp(lower[c], max=0.0)
        hi = torch.clamp(upper[c], min=0.0)
        scale = (hi - lo) / levels
        scale = scale if scale > 0 else torch.tensor(1.0)
        zero = torch.clamp(torch.round(-lo / scale), 0, levels)
        for r in range(x.shape[0]):
            code = torch.clamp(torch.round(x[r, c] / scale) + zero, 0, levels)
            out[r, c] = (code - zero) * scale
    return out


def _adversarial(generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(12, 7, generator=generator)
    x[3, 1] = 60.0  # an outlier
    x[:, 2] = 0.0  # an all-zero channel
    x[:, 3] = 1.5  # a constant (positive) channel
    x[:, 4] = -x[:, 4].abs() - 0.1  # an all-negative channel
    return x


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dual_clipping_matches_a_plain_reference_and_the_per_channel_quantizer(bits):
    generator = torch.Generator().manual_seed(bits)
    spec = QuantSpec(bits, False, PerColumn())
    for x in (torch.randn(12, 7, generator=generator) * 3, _adversarial(generator)):
        lower = x.amin(0) * (0.5 + torch.rand(7, generator=generator))
        upper = x.amax(0) * (0.5 + torch.rand(7, generator=generator))
        got = fake_quantize_between(x, lower, upper, spec)
        assert torch.equal(got, _reference(x, lower, upper, bits))
        grid = qparams_from_range(lower.reshape(1, -1), upper.reshape(1, -1), spec)
        assert torch.equal(got, fake_quantize(x, spec, grid))
    with pytest.raises(NonFiniteError):
        fake_quantize_between(torch.tensor([[0.5, float("nan")]]), -torch.ones(2), torch.ones(2),
                              spec)  # fmt: skip
    with pytest.raises(QuantConfigError, match="asymmetric"):
        fake_quantize_between(x, lower, upper, QuantSpec(bits, True, PerColumn()))


def test_clipping_quantizer_starts_as_the_calibrated_grid_and_passes_gradients_to_its_bounds():
    generator = torch.Generator().manual_seed(1)
    x = _adversarial(generator)
    spec = QuantSpec(4, False, PerTensor(), range_method="mse")
    calibrated = compute_qparams(x, QuantSpec(4, False, PerColumn(), range_method="mse"))
    clipper = ClippingQuantizer(spec, calibrated)
    torch.testing.assert_close(clipper.qparams.scale, calibrated.scale)
    assert torch.equal(clipper.qparams.zero_point, calibrated.zero_point)
    (out,) = clipper(None, (x,))
    assert torch.equal(out, fake_quantize(x, clipper.spec, calibrated))

    with torch.no_grad():
        clipper.factors[1, 1] = 0.5  # channel 1's upper bound halved: its outlier is clipped
    clipper.factors.requires_grad_(True)
    leaf = x.clone().requires_grad_(True)
    (out,) = clipper(None, (leaf,))
    out.sum().backward()
    grid = clipper.qparams
    codes = torch.round(x / grid.scale) + grid.zero_point
    inside = (codes >= 0) & (codes <= 15)
    assert not inside[3, 1], "the outlier is clipped"
    assert torch.equal(leaf.grad, inside.float()), "straight through inside, zero where clipped"
    assert clipper.factors.grad[1, 1] > 0, "the clipped outlier pulls its channel's upper bound"
    assert clipper.factors.grad[:, 2].abs().sum() == 0, "an all-zero channel has nothing to learn"
    with pytest.raises(QuantConfigError, match="float32"):
        ClippingQuantizer(QuantSpec(4, False, PerTensor(), scale_dtype="float16"), calibrated)


def test_learned_clipping_lowers_the_error_to_about_the_mse_search():
    """Starting from the full min–max ranges, learning the bounds on the quantization error
    clips the outliers' bounds and comes within 10% of the MSE range search's error."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(512, 4, generator=generator)
    x[0, 0], x[1, 1] = 12.0, -10.0  # outliers stretch channel 0's and channel 1's ranges
    clipper = ClippingQuantizer(
        QuantSpec(4, False, PerTensor()), compute_qparams(x, QuantSpec(4, False, PerColumn()))
    )
    error = lambda: (clipper(None, (x,))[0] - x).square().mean()  # noqa: E731
    before = error().item()
    clipper.factors.requires_grad_(True)
    optimizer = torch.optim.Adam([clipper.factors], lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        error().backward()
        optimizer.step()
    with torch.no_grad():
        after = error().item()
    mse = QuantSpec(4, False, PerColumn(), range_method="mse")
    searched = (fake_quantize(x, mse, compute_qparams(x, mse)) - x).square().mean().item()
    assert after < 0.9 * before and after < 1.1 * searched, (before, after, searched)
    assert clipper.factors[1, 0] < 0.9 and clipper.factors[0, 1] < 0.9, clipper.factors


def _repquant(**args) -> Recipe:
    return Recipe.from_dict({
        "name": "repquant-test", "weights": WEIGHTS4, "activations": STATIC4,
        "attention": ATTENTION4,
        "steps": [{"method": "repquant", "args": {"batch_size": 8, "lr": 2e-3, **args}}],
    })  # fmt: skip


def test_repquant_learns_clipping_rounds_every_weight_and_beats_no_training(tiny_dinov2):
    pixels = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = tiny_dinov2(pixel_values=pixels).last_hidden_state
    errors = {}
    untrained = {"clipping": False, "reconstruct_weights": False}
    for name, args in (("untrained", untrained), ("repquant", {"iters": 100, "clip_lr": 1e-2})):
        model = deepcopy(tiny_dinov2)
        result = quantize(model, _repquant(**args), pixels, progress=False)
        method = result.methods[0]
        for layer in model.encoder.layer:
            assert isinstance(attention_quantizers(layer.attention).probs, LogSqrt2Quantizer)
            for linear in (layer.attention.q_proj, layer.mlp.fc1, layer.mlp.fc2):
                quantizer = input_quantizer(linear)
                assert isinstance(quantizer.spec.granularity, PerTensor), "reparameterized"
                grid = weight_grid(linear)
                torch.testing.assert_close(
                    linear.weight, fake_quantize(linear.weight, grid.spec, grid.qparams)
                )
        with torch.no_grad():
            got = model(pixel_values=pixels).last_hidden_state
        errors[name] = ((got - expected).norm() / expected.norm()).item()
        if name == "untrained":
            assert method.losses == {}
            assert set(method.factors.values()) == {(1.0, 1.0)}
            continue
        assert {stage for _, stage in method.losses} == {2, 4}
        for (block, stage), loss in method.losses.items():
            if stage == 2:  # clipping: never worse than the calibrated bounds (kept if so)
                assert loss.loss_after <= loss.loss_before, (block, loss)
            else:
                assert loss.loss_after < 0.9 * loss.loss_before, (block, loss)
        learned = [key for key, loss in method.losses.items() if loss.loss_after < loss.loss_before]
        assert any(stage == 2 for _, stage in learned), method.losses
        assert any(factors != (1.0, 1.0) for factors in method.factors.values())
    assert errors["repquant"] < 0.8 * errors["untrained"], errors


def test_repquant_saves_and_loads_back_bit_identically(tiny_dinov2, tmp_path):
    pixels = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    quantize(tiny_dinov2, _repquant(iters=3), pixels, progress=False)
    with torch.no_grad():
        expected = tiny_dinov2(pixel_values=pixels).last_hidden_state
    loaded = load_vision_model(save_quantized(tiny_dinov2, None, tmp_path / "fake"), "cpu")
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).last_hidden_state, expected)


def test_repquant_recipe_errors_are_clear(tiny_dinov2, make_tiny_model):
    with pytest.raises(RecipeError, match="last step"):
        plan(tiny_dinov2, Recipe.from_dict({
            "weights": WEIGHTS4, "activations": STATIC4,
            "steps": [{"method": "repquant"}, {"method": "rtn"}],
        }))  # fmt: skip
    with pytest.raises(RecipeError, match="static asymmetric"):
        plan(tiny_dinov2, Recipe.from_dict({
            "weights": WEIGHTS4, "activations": {**STATIC4, "symmetric": True},
            "steps": [{"method": "repquant"}],
        }))  # fmt: skip
    with pytest.raises(RecipeError, match="log√2"):
        plan(tiny_dinov2, Recipe.from_dict({
            "weights": WEIGHTS4, "activations": STATIC4,
            "attention": {**ATTENTION4, "probs": STATIC4},
            "steps": [{"method": "repquant"}],
        }))  # fmt: skip
    with pytest.raises(RecipeError, match="clip_lr"):
        plan(tiny_dinov2, _repquant(clip_lr=0))
    with pytest.raises(UnsupportedModelError, match="Vision Transformer"):
        plan(make_tiny_model("llama"), _repquant())
