"""LPViT block pruning (scores, distortion curves, slope-matched allocation) and the
block-sparse CPU linear that skips the pruned blocks, on tiny random models."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import tiny_vision_model
from torch import nn

from channelwise.adapters import adapter_for
from channelwise.compress import plan, quantize
from channelwise.deploy.block_sparse import BlockSparseLinear, block_sparse_model
from channelwise.errors import PackingError, RecipeError, UnsupportedModelError
from channelwise.methods.lpvit import MASK_ATTR, allocate, block_mask, distortion_curve
from channelwise.recipe import Recipe, load_recipe


def test_distortion_curve_prunes_the_lowest_scoring_blocks_first():
    score = torch.tensor([[3.0, 1.0], [4.0, 2.0]], dtype=torch.float64)
    energy = torch.tensor([[30.0, 10.0], [40.0, 20.0]], dtype=torch.float64)
    levels = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    curve, order = distortion_curve(score, energy, levels)
    torch.testing.assert_close(curve, torch.tensor([0.0, 10, 30, 60, 100], dtype=torch.float64) / 4)
    mask = block_mask(order, 0.5, 2, 3, (4, 6))  # blocks of 2×3 on a 4×6 weight
    expected = torch.tensor([[True, False], [True, False]])
    assert torch.equal(mask[::2, ::3], expected) and mask.shape == (4, 6)
    assert mask[:2, 3:].eq(False).all() and mask[2:, :3].all()


def test_allocation_prunes_the_flatter_curve_more_and_meets_the_flops_target():
    levels = torch.linspace(0, 1, 101, dtype=torch.float64)
    curves = {"steep": 10 * levels**2, "flat": levels**2}
    sizes = {"steep": 100, "flat": 100}
    amounts, kept = allocate(curves, sizes, levels, target=0.5)
    assert amounts["flat"] > amounts["steep"]
    assert kept == pytest.approx(0.5, abs=0.02)
    big = {"steep": 300, "flat": 100}  # kept FLOPs weigh each layer by its size
    amounts, kept = allocate(curves, big, levels, target=0.7)
    assert kept == pytest.approx(0.7, abs=0.02)


def _lpvit(**args) -> Recipe:
    return Recipe.from_dict({"name": "lpvit-test", "steps": [{"method": "lpvit", "args": args}]})


def test_lpvit_zeroes_whole_blocks_to_the_flops_target_and_the_sparse_model_agrees():
    model = tiny_vision_model("dinov2")
    pixels = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = quantize(model, _lpvit(flops=0.6, block=[8, 8]), pixels, progress=False)
    method = result.methods[0]
    assert method.kept_flops == pytest.approx(0.6, abs=0.03)
    adapter = adapter_for(model)
    names, kept, total = [], 0, 0
    for index, block in enumerate(adapter.block_list(model)):
        for name, linear in adapter.block_linears(block).items():
            full = f"{adapter.blocks}.{index}.{name}"
            names.append(full)
            mask = getattr(linear, MASK_ATTR)
            assert linear.weight[~mask].eq(0).all()
            blocks = linear.weight.reshape(linear.weight.shape[0] // 8, 8, -1, 8)
            zero_blocks = blocks.eq(0).all(3).all(1).float().mean().item()
            assert zero_blocks == pytest.approx(method.amounts[full], abs=1e-6)
            kept += mask.sum().item()
            total += mask.numel()
    assert kept / total == pytest.approx(method.kept_flops, abs=1e-6)
    with torch.no_grad():
        expected = model(pixel_values=pixels).last_hidden_state
    replaced = block_sparse_model(model, names, (8, 8))
    assert replaced and all(isinstance(model.get_submodule(n), BlockSparseLinear) for n in replaced)
    with torch.no_grad():
        got = model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_block_sparse_linear_equals_the_dense_masked_product(bias):
    generator = torch.Generator().manual_seed(1)
    linear = nn.Linear(48, 32, bias=bias)
    keep = torch.rand(4, 6, generator=generator) < 0.5
    keep[1] = False  # a block row with nothing kept: output is the bias
    keep[2] = True  # a full row: one tile
    with torch.no_grad():
        linear.weight.mul_(keep.repeat_interleave(8, 0).repeat_interleave(8, 1))
    sparse = BlockSparseLinear(linear, (8, 8))
    assert sparse.kept_fraction == pytest.approx(keep.float().mean().item())
    x = torch.randn(3, 5, 48, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), linear(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(PackingError, match="blocks"):
        BlockSparseLinear(nn.Linear(50, 32), (8, 8))


def test_lpvit_recipe_errors_are_clear(make_tiny_model):
    model = tiny_vision_model("dinov2")
    with pytest.raises(RecipeError, match="does not split"):
        plan(model, _lpvit(block=[12, 12]))
    with pytest.raises(RecipeError, match="flops"):
        plan(model, _lpvit(flops=1.0))
    with pytest.raises(UnsupportedModelError, match="Vision Transformer"):
        plan(make_tiny_model("llama"), _lpvit())
    with pytest.raises(PackingError, match="not a float nn.Linear"):
        block_sparse_model(model, ["encoder.layer.0.norm1"], (8, 8))


def test_reconstruction_after_pruning_keeps_the_blocks_zero_and_recovers_the_output():
    pixels = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    dense = tiny_vision_model("dinov2")
    with torch.no_grad():
        expected = dense(pixel_values=pixels).last_hidden_state
    errors = {}
    for iters in (0, 200):
        model = tiny_vision_model("dinov2")
        recipe = _lpvit(flops=0.5, block=[8, 8], reconstruct_iters=iters, lr=5e-3, batch_size=8)
        method = quantize(model, recipe, pixels, progress=False).methods[0]
        for linear in adapter_for(model).block_linears(model.encoder.layer[1]).values():
            assert linear.weight[~getattr(linear, MASK_ATTR)].eq(0).all()
        for loss in method.losses.values():
            assert loss.loss_after < loss.loss_before
        assert len(method.losses) == (2 if iters else 0)
        with torch.no_grad():
            got = model(pixel_values=pixels).last_hidden_state
        errors[iters] = ((got - expected).norm() / expected.norm()).item()
    assert errors[200] < 0.9 * errors[0], errors


def test_finetuning_after_pruning_keeps_the_blocks_zero_and_lowers_the_distillation_loss():
    pixels = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    dense = tiny_vision_model("dinov2")
    with torch.no_grad():
        expected = dense(pixel_values=pixels).last_hidden_state
    errors = {}
    for steps in (0, 150):
        model = tiny_vision_model("dinov2")
        args = dict(flops=0.5, block=[8, 8], finetune_steps=steps, finetune_lr=1e-3, batch_size=8)
        method = quantize(model, _lpvit(**args), pixels, progress=False).methods[0]
        for layer in model.encoder.layer:
            for linear in adapter_for(model).block_linears(layer).values():
                assert not hasattr(linear, "parametrizations")
                assert linear.weight[~getattr(linear, MASK_ATTR)].eq(0).all()
        if steps:
            assert method.finetune.loss_after < 0.9 * method.finetune.loss_before, method.finetune
        else:
            assert method.finetune is None
        with torch.no_grad():
            got = model(pixel_values=pixels).last_hidden_state
        errors[steps] = ((got - expected).norm() / expected.norm()).item()
    # a tiny random model's output moves little when pruned (2.6%): the part fine-tuning recovers
    assert errors[150] < 0.95 * errors[0], errors


def test_finetuning_on_few_calibration_images_is_warned_about(caplog):
    pixels = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for steps in (0, 2):
        caplog.clear()
        args = dict(flops=0.5, block=[8, 8], finetune_steps=steps, batch_size=4)
        with caplog.at_level(logging.WARNING, logger="channelwise.methods.lpvit"):
            quantize(tiny_vision_model("dinov2"), _lpvit(**args), pixels, progress=False)
        warned = [r.getMessage() for r in caplog.records if "calibration images" in r.getMessage()]
        assert len(warned) == (1 if steps else 0), warned
    assert "on only 8 calibration images (1 passes" in warned[0], warned


def test_the_lpvit_preset_asks_for_half_the_flops_and_fine_tuning_and_plans_on_a_vit():
    recipe = load_recipe("lpvit-50")
    (step,) = recipe.steps
    assert step.method == "lpvit" and step.args["flops"] == 0.5 and step.args["finetune_steps"]
    assert step.args["finetune_targets"] == "blocks"  # −9.60 pt against −12.95 at 3,000 steps
    plan(tiny_vision_model("dinov2"), recipe)


@pytest.mark.parametrize("method", ["lpvit", "bivit"])
def test_whole_model_training_shows_its_progress_bar_only_when_asked(method, capfd):
    """LPViT's fine-tuning (at the last block) and BiViT's training (in ``prepare_model``) run
    for minutes to hours: ``quantize(progress=True)`` shows their distillation bar."""
    pixels = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    if method == "lpvit":
        args = dict(flops=0.5, block=[8, 8], finetune_steps=3, batch_size=4)
    else:
        args = dict(steps=3, batch_size=4, mlp=False)
    recipe = Recipe.from_dict({"name": "t", "steps": [{"method": method, "args": args}]})
    shown = {}
    for progress in (False, True):
        quantize(tiny_vision_model("dinov2"), recipe, pixels, progress=progress)
        shown[progress] = "distil" in capfd.readouterr().err
    assert shown == {False: False, True: True}


def test_layerwise_targets_are_the_block_outputs_and_the_loss_weighs_each_by_its_scale():
    from channelwise.distill import distillation_loss, teacher_features

    model = tiny_vision_model("dinov2")
    adapter = adapter_for(model)
    pixels = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    targets = teacher_features(model, adapter, pixels, batch_size=4, blocks=True)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    expected = [*out.hidden_states[1:], out.last_hidden_state]  # after each block, then the norm
    assert len(targets.tensors) == len(model.encoder.layer) + 1
    for got, want, scale in zip(targets.tensors, expected, targets.scales, strict=True):
        torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-3)  # float16 blocks
        assert scale == pytest.approx(want.square().mean().item(), rel=1e-4)
    assert distillation_loss(model, adapter, pixels, targets, 4) < 1e-5
    with torch.no_grad():
        fc2 = model.encoder.layer[1].mlp.fc2.weight
        fc2.add_(torch.randn(fc2.shape, generator=torch.Generator().manual_seed(6)))
        moved = model(pixel_values=pixels, output_hidden_states=True)
    moved = [*moved.hidden_states[1:], moved.last_hidden_state]
    reference = sum(
        ((m - t.float()).square().mean() / s).item()
        for m, t, s in zip(moved, targets.tensors, targets.scales, strict=True)
    ) / len(moved)
    assert distillation_loss(model, adapter, pixels, targets, 4) == pytest.approx(
        reference, rel=1e-4
    )
    assert reference > 1e-2, reference


def test_layerwise_finetuning_lowers_its_loss_and_keeps_the_pruned_blocks_zero():
    pixels = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    model = tiny_vision_model("dinov2")
    args = dict(flops=0.5, block=[8, 8], finetune_steps=100, finetune_lr=1e-3, batch_size=8,
                finetune_targets="blocks")  # fmt: skip
    method = quantize(model, _lpvit(**args), pixels, progress=False).methods[0]
    assert method.finetune.loss_after < 0.8 * method.finetune.loss_before, method.finetune
    for layer in model.encoder.layer:
        for linear in adapter_for(model).block_linears(layer).values():
            assert linear.weight[~getattr(linear, MASK_ATTR)].eq(0).all()
    with pytest.raises(RecipeError, match="finetune_targets"):
        plan(model, _lpvit(finetune_targets="logits"))
