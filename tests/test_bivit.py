"""BiViT: binary weights, sign activations and softmax-aware binarization against plain
references (random and adversarial inputs), their gradients, and the ``bivit`` QAT method on tiny
random DINOv2 models."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import tiny_dinov2_config

from channelwise.compare import bits_label, weight_bits
from channelwise.compress import plan, quantize, save_quantized
from channelwise.errors import NonFiniteError, RecipeError, UnsupportedModelError
from channelwise.quant.attention import attention_quantizers
from channelwise.quant.binary import (
    SoftmaxBinarizer,
    binarize_softmax,
    binary_weight,
    has_sign_input,
    initial_alpha,
    sign_straight_through,
)
from channelwise.recipe import Recipe
from channelwise.vision import load_vision_model


def _adversarial(generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(6, 9, generator=generator)
    x[0] = 0.0  # zeros
    x[1] = 0.7  # a constant row
    x[2, 3] = 80.0  # an outlier
    x[3, :4] = -1.0  # exactly at the clipping edge
    return x


def test_sign_matches_a_plain_reference_and_clips_its_gradient():
    generator = torch.Generator().manual_seed(0)
    for x in (torch.randn(5, 7, generator=generator) * 2, _adversarial(generator)):
        expected = torch.tensor([[1.0 if v >= 0 else -1.0 for v in row] for row in x.tolist()])
        leaf = x.clone().requires_grad_(True)
        out = sign_straight_through(leaf)
        assert torch.equal(out.detach(), expected)
        (out * torch.arange(x.numel()).reshape(x.shape)).sum().backward()
        inside = torch.tensor([[1.0 if abs(v) < 1 else 0.0 for v in row] for row in x.tolist()])
        assert torch.equal(leaf.grad, inside * torch.arange(x.numel()).reshape(x.shape))
    with pytest.raises(NonFiniteError):
        sign_straight_through(torch.tensor([1.0, float("nan")]))


def test_binary_weights_match_a_plain_reference_and_train_alpha_exactly():
    generator = torch.Generator().manual_seed(1)
    for weight in (torch.randn(4, 10, generator=generator), _adversarial(generator)):
        alpha = initial_alpha(weight)
        expected = torch.empty_like(weight)
        for r, row in enumerate(weight.tolist()):
            mean = sum(row) / len(row)
            scale = sum(abs(v - mean) for v in row) / len(row)
            assert alpha[r].item() == pytest.approx(scale, rel=1e-5, abs=1e-7)
            for c, v in enumerate(row):
                expected[r, c] = alpha[r] * (1.0 if v - mean >= 0 else -1.0)
        leaf = weight.clone().requires_grad_(True)
        trained = alpha.clone().requires_grad_(True)
        out = binary_weight(leaf, trained)
        assert torch.equal(out.detach(), expected)
        upstream = torch.randn(weight.shape, generator=generator)
        (out * upstream).sum().backward()
        signs = torch.where(weight - weight.mean(1, keepdim=True) >= 0, 1.0, -1.0)
        torch.testing.assert_close(trained.grad, (signs * upstream).sum(1))
        # straight through the sign, then through the row centring
        centred_grad = upstream - upstream.mean(1, keepdim=True)
        torch.testing.assert_close(leaf.grad, alpha.unsqueeze(1) * centred_grad)
    assert torch.equal(initial_alpha(torch.full((2, 5), 3.0)), torch.zeros(2)), "constant rows"


def test_softmax_binarization_matches_a_plain_reference_and_passes_gradients_through():
    generator = torch.Generator().manual_seed(2)
    probs = torch.softmax(3 * torch.randn(5, 12, generator=generator), dim=-1)
    probs[0] = 1.0 / 12  # uniform: every entry is the peak
    probs[1] = 0.0
    probs[1, 4] = 1.0  # one-hot
    for beta in (0.25, 0.45, 1.0):
        expected = torch.tensor(
            [[1.0 if v >= beta * max(row) else 0.0 for v in row] for row in probs.tolist()]
        )
        assert torch.equal(binarize_softmax(probs, beta), expected)
        assert torch.equal(SoftmaxBinarizer(beta)(probs), expected)
    assert torch.equal(binarize_softmax(probs, 0.25)[0], torch.ones(12))
    leaf = probs.clone().requires_grad_(True)
    (binarize_softmax(leaf, 0.25) * 3).sum().backward()
    assert torch.equal(leaf.grad, torch.full_like(probs, 3.0))
    with pytest.raises(NonFiniteError):
        binarize_softmax(torch.tensor([[0.5, float("inf")]]), 0.25)


def _bivit(**args) -> Recipe:
    args = {"steps": 40, "batch_size": 8, "lr": 2e-3, **args}
    return Recipe.from_dict({"name": "bivit-test", "steps": [{"method": "bivit", "args": args}]})


def test_bivit_binarizes_attention_then_mlp_and_training_lowers_the_distillation_loss(
    tiny_dinov2, tmp_path
):
    pixels = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    reference = transformers.Dinov2Model(tiny_dinov2_config()).eval()
    reference.load_state_dict(tiny_dinov2.state_dict())
    result = quantize(tiny_dinov2, _bivit(), pixels, progress=False)
    method = result.methods[0]
    assert set(method.losses) == {1, 2}
    for stage, loss in method.losses.items():
        assert loss.loss_after < 0.9 * loss.loss_before, (stage, loss)
    for layer in tiny_dinov2.encoder.layer:
        quant = attention_quantizers(layer.attention)
        assert isinstance(quant.probs, SoftmaxBinarizer)
        for linear in (layer.attention.q_proj, layer.attention.o_proj, layer.mlp.fc1):
            assert not hasattr(linear, "parametrizations"), "binary weights written in"
            for row in linear.weight:  # two levels per row: ±α
                levels = row.abs().unique()
                assert levels.numel() == 1, levels
    assert bits_label(_bivit()) == "W1A1 attention, W1 MLP"
    assert bits_label(_bivit(mlp=False)) == "W1A1 attention"
    shapes = {name: m.weight.shape for name, m in reference.encoder.layer[0].named_modules()
              if isinstance(m, torch.nn.Linear)}  # fmt: skip
    total = sum(rows * cols for rows, cols in shapes.values())
    binary = sum(rows * (cols + 32) for rows, cols in shapes.values())  # 1 bit + float32 α
    assert weight_bits(_bivit(), reference) == pytest.approx(binary / total)
    attention_only = sum(
        rows * (cols + 32) if name.startswith("attention") else rows * cols * 16
        for name, (rows, cols) in shapes.items()
    )
    assert weight_bits(_bivit(mlp=False), reference) == pytest.approx(attention_only / total)
    with torch.no_grad():
        expected = tiny_dinov2(pixel_values=pixels).last_hidden_state
    folder = save_quantized(tiny_dinov2, None, tmp_path / "out")
    loaded = load_vision_model(folder, "cpu")
    assert all(has_sign_input(layer.attention.q_proj) for layer in loaded.encoder.layer)
    assert not has_sign_input(loaded.encoder.layer[0].mlp.fc1)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).last_hidden_state, expected)


def test_bivit_recipe_errors_are_clear(tiny_dinov2, make_tiny_model):
    with pytest.raises(RecipeError, match="only step"):
        plan(tiny_dinov2, Recipe.from_dict({
            "weights": {"bits": 4, "symmetric": False, "granularity": "channel"},
            "steps": [{"method": "bivit"}],
        }))  # fmt: skip
    with pytest.raises(RecipeError, match="beta"):
        plan(tiny_dinov2, _bivit(beta=0))
    with pytest.raises(UnsupportedModelError, match="Vision Transformer"):
        plan(make_tiny_model("llama"), _bivit())
