"""Specification of the AWQ step: exact scale folds, searches that lower what they measure."""

import pytest
import torch
from helpers import FAMILIES, inject_outlier_channel, logits
from torch import nn

from channelwise.adapters import adapter_for, linear_weight
from channelwise.compress import METHODS_ATTR, plan, quantize, save_quantized
from channelwise.engine import run_blockwise
from channelwise.errors import RecipeError, UnsupportedModelError
from channelwise.methods.awq import (
    AWQ,
    awq_scales,
    clip_search,
    group_gram,
    group_output_error,
    scaled_fake_quantize,
    search_scales,
)
from channelwise.models import load_model
from channelwise.quant import QuantSpec, fake_quantize
from channelwise.quant.granularity import PerGroup
from channelwise.recipe import Recipe, Step, load_recipe

SPEC = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(32))


def awq_recipe(group_size: int = 32, quantizer: str = "rtn", **args) -> Recipe:
    """AWQ then a quantizing step, INT4 asymmetric in groups that divide the tiny widths."""
    return Recipe(
        name="awq-test",
        weights={"bits": 4, "symmetric": False, "granularity": "group", "group_size": group_size},
        steps=(Step(method="awq", args=args), Step(method=quantizer)),
    )


def max_relative(after: torch.Tensor, before: torch.Tensor) -> float:
    return ((after - before).abs().max() / before.abs().max()).item()


def outlier_inputs(n: int = 512, features: int = 128, seed: int = 0) -> torch.Tensor:
    """Gaussian inputs whose channels 3 and 70 are 40× and 25× larger, as in LLM activations."""
    x = torch.randn(n, features, generator=torch.Generator().manual_seed(seed))
    x[:, 3] *= 40.0
    x[:, 70] *= 25.0
    return x


@pytest.mark.parametrize("family", FAMILIES)
def test_scale_folds_alone_keep_the_model(tiny_model, calibration_ids, token_ids) -> None:
    """With clipping off and no rounding, AWQ's chosen scales change weights, not the function."""
    adapter = adapter_for(tiny_model)
    before = logits(tiny_model, token_ids)
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    awq, _rtn = plan(tiny_model, awq_recipe(clip=False))
    run_blockwise(tiny_model, adapter, calibration_ids, awq.apply, batch_size=3, progress=False)
    assert any(not torch.equal(v, state[k]) for k, v in tiny_model.state_dict().items())
    assert max_relative(logits(tiny_model, token_ids), before) < 1e-5
    foldable = [
        s.name for s in adapter.subsets if s.prev_kind in ("norm", "linear", "grouped_heads")
    ]
    assert sorted(awq.alphas) == sorted((i, name) for i in range(2) for name in foldable)


def test_grouped_query_attention_scales_v_into_o(make_tiny_model, calibration_ids) -> None:
    model = make_tiny_model("llama")
    assert adapter_for(model).subsets[1].prev_kind == "grouped_heads"
    inject_outlier_channel(model, factor=30.0)
    awq, _ = plan(model, awq_recipe(clip=False))
    run_blockwise(model, adapter_for(model), calibration_ids, awq.apply, progress=False)
    assert len(awq.losses[(0, "attn_out")]) == 20


def test_scales_follow_the_official_normalization() -> None:
    mean_abs = torch.tensor([0.0, 0.5, 2.0, 8.0])
    s = awq_scales(mean_abs, 0.5)
    raw = mean_abs.sqrt().clamp(min=1e-4)
    torch.testing.assert_close(s, raw / (raw.max() * raw.min()).sqrt())
    torch.testing.assert_close(awq_scales(mean_abs, 0.0), torch.ones(4))


def test_awq_then_rtn_beats_rtn_on_a_linear_with_outlier_inputs() -> None:
    x = outlier_inputs()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))

    def output_mse(w_hat: torch.Tensor) -> float:
        return (x @ (w_hat - w).t()).square().mean().item()

    alpha, s, losses = search_scales(
        x.abs().mean(0), lambda s: output_mse(scaled_fake_quantize(w, s, SPEC)), 20
    )
    assert alpha > 0 and min(losses) == losses[round(alpha * 20)]
    rtn = output_mse(fake_quantize(w, SPEC))
    assert losses[0] == pytest.approx(rtn)
    awq = output_mse(scaled_fake_quantize(w, s, SPEC))
    assert awq < 0.8 * rtn, f"awq {awq:.4g} vs rtn {rtn:.4g}"
    bound = clip_search(w * s, group_gram(x / s, 32), SPEC).view(64, -1, 1)
    clipped = torch.clamp((w * s).view(64, -1, 32), -bound, bound).view(64, 128)
    assert output_mse(fake_quantize(clipped, SPEC) / s) <= awq * 1.0001


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_search_never_increases_the_error_it_measures(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = outlier_inputs(seed=seed)
    w = torch.randn(48, 128, generator=generator)
    w[:, 7] *= 6.0  # a heavy-tailed weight column: clipping it should pay somewhere
    gram = group_gram(x, 32)
    unclipped = group_output_error(w - fake_quantize(w, SPEC), gram)
    bound = clip_search(w, gram, SPEC, clip_grid=20, max_shrink=0.5)
    assert bound.shape == (48, 4, 1)
    w_clipped = torch.clamp(w.view(48, 4, 32), -bound, bound).view(48, 128)
    clipped = group_output_error(w - fake_quantize(w_clipped, SPEC), gram)
    assert (clipped <= unclipped * (1 + 1e-6)).all()
    assert clipped.sum() < unclipped.sum()
    ratios = bound.squeeze(-1) / w.view(48, 4, 32).abs().amax(-1)
    assert ratios.min() >= 0.55 - 1e-6 and ratios.max() <= 1 + 1e-6


def test_group_output_error_is_the_mean_squared_partial_output() -> None:
    x = outlier_inputs(n=64)
    delta = torch.randn(8, 128, generator=torch.Generator().manual_seed(3))
    direct = torch.einsum("ngk,ogk->nog", x.view(64, 4, 32), delta.view(8, 4, 32)).square().mean(0)
    torch.testing.assert_close(
        group_output_error(delta, group_gram(x, 32)), direct, rtol=1e-4, atol=0
    )


def block_output_error(model: nn.Module, reference: nn.Module, ids: torch.Tensor) -> float:
    """MSE of block 0's output against the float model's, on the same (embedding) inputs."""
    outs = []
    for m in (model, reference):
        captured = []
        block = adapter_for(m).block_list(m)[0]
        handle = block.register_forward_hook(lambda _m, _a, out, c=captured: c.append(out[0]))
        logits(m, ids)
        handle.remove()
        outs.append(captured[0])
    return (outs[0] - outs[1]).square().mean().item()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_search_lowers_block_output_error_under_an_outlier_channel(
    make_tiny_model, family, calibration_ids, token_ids
) -> None:
    reference = make_tiny_model(family)
    inject_outlier_channel(reference, factor=30.0)
    errors = {}
    for name, recipe in (("rtn", load_recipe("rtn-w4a16-g64")), ("awq", awq_recipe(clip=False))):
        model = make_tiny_model(family)
        inject_outlier_channel(model, factor=30.0)
        recipe = recipe.model_copy(update={"weights": awq_recipe().weights})
        quantize(model, recipe, calibration_ids, progress=False)
        errors[name] = block_output_error(model, reference, token_ids)
        if name == "awq":
            awq = getattr(model, METHODS_ATTR)[0]
            assert isinstance(awq, AWQ)
            assert awq.alphas[(0, "attn_in")] > 0
            losses = awq.losses[(0, "attn_in")]
            assert min(losses) < losses[0]
    assert errors["awq"] < errors["rtn"], errors


@pytest.mark.parametrize("family", FAMILIES)
def test_awq_with_rtn_or_gptq_runs_on_every_foldable_family(
    make_tiny_model, family, calibration_ids, token_ids
) -> None:
    for quantizer in ("rtn", "gptq"):
        model = make_tiny_model(family)
        quantize(model, awq_recipe(quantizer=quantizer), calibration_ids, progress=False)
        assert torch.isfinite(logits(model, token_ids)).all()
    adapter = adapter_for(model)
    weight = linear_weight(adapter.block_list(model)[0].get_submodule(adapter.linear_names()[0]),
                           adapter.transposed_weights)  # fmt: skip
    assert weight.unique().numel() <= 16 * weight.numel() // 32 + 1  # on a 4-bit group grid


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (Recipe(name="r", weights=awq_recipe().weights, steps=(Step(method="awq"),)),
         "follow it with a quantizing step"),
        (awq_recipe().model_copy(update={"steps": (Step(method="rtn"), Step(method="awq"))}),
         "must come before weight quantization"),
        (Recipe(name="r", steps=(Step(method="awq"), Step(method="gptq"))), "'weights' quantizer"),
        (awq_recipe(group_size=48), "group size 48 does not divide 64"),
        (awq_recipe(n_grid=0), "n_grid"),
        (awq_recipe(max_shrink=1.0), "max_shrink"),
        (Recipe(name="r", weights={"bits": 4, "granularity": "tensor"},
                steps=(Step(method="awq"), Step(method="rtn"))), "clip search needs"),
    ],
)  # fmt: skip
def test_bad_recipes_fail_before_any_change(make_tiny_model, recipe, message) -> None:
    model = make_tiny_model("llama")
    with pytest.raises(RecipeError, match=message) as info:
        plan(model, recipe)
    assert "\n" not in str(info.value)


def test_per_tensor_weights_work_without_clipping(make_tiny_model, calibration_ids) -> None:
    recipe = Recipe(
        name="r",
        weights={"bits": 4, "granularity": "tensor"},
        steps=(Step(method="awq", args={"clip": False}), Step(method="rtn")),
    )
    model = make_tiny_model("qwen2")
    quantize(model, recipe, calibration_ids, progress=False)
    adapter = adapter_for(model)
    for module in adapter.block_linears(adapter.block_list(model)[0]).values():
        assert linear_weight(module, adapter.transposed_weights).unique().numel() <= 2**4


def test_post_ln_opt_is_refused(opt_post_ln, calibration_ids) -> None:
    with pytest.raises(UnsupportedModelError, match="awq cannot be applied.*post-LN"):
        quantize(opt_post_ln, awq_recipe(), calibration_ids, progress=False)


def test_preset() -> None:
    recipe = load_recipe("awq-w4a16-g64")
    assert [step.method for step in recipe.steps] == ["awq", "rtn"]
    assert recipe.weights == load_recipe("rtn-w4a16-g64").weights


def test_saved_awq_model_loads_back_with_identical_logits(
    make_tiny_model, tiny_tokenizer, tmp_path, calibration_ids, token_ids
) -> None:
    model = make_tiny_model("mistral")
    quantize(model, awq_recipe(), calibration_ids, progress=False)
    expected = logits(model, token_ids)
    loaded, _ = load_model(save_quantized(model, tiny_tokenizer, tmp_path / "out"))
    assert torch.equal(logits(loaded, token_ids), expected)
