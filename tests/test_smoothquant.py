"""Specification of the SmoothQuant step: exact smoothing, then a better W8A8 under outliers."""

import pytest
import torch
from helpers import inject_outlier_channel, logits, relative_error
from torch import nn

import channelwise.methods.smoothquant  # noqa: F401  (registers the method)
from channelwise.adapters import adapter_for
from channelwise.compress import plan, quantize
from channelwise.engine import run_blockwise
from channelwise.errors import RecipeError, UnsupportedModelError
from channelwise.methods.smoothquant import DEFAULT_ALPHA, SmoothQuant
from channelwise.recipe import Recipe, Step, load_recipe
from channelwise.transforms import smooth_scales, weight_input_absmax

LLAMA_LIKE = ("llama", "qwen2", "mistral")
ALL_FOLDABLE = {
    "llama": ["attn_in", "attn_out", "mlp_in", "mlp_out"],
    "qwen2": ["attn_in", "attn_out", "mlp_in", "mlp_out"],
    "mistral": ["attn_in", "attn_out", "mlp_in", "mlp_out"],
    "opt": ["attn_in", "attn_out", "mlp_in"],
}


def smooth_only(**args) -> Recipe:
    """Smoothing with no quantizer: no weights, so no default rtn step either."""
    return Recipe(name="smooth-only", steps=(Step(method="smoothquant", args=args),))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"


def test_smoothing_alone_keeps_the_model(tiny_model, calibration_ids, token_ids) -> None:
    before = logits(tiny_model, token_ids)
    state = snapshot(tiny_model)
    recipe = smooth_only()
    assert recipe.steps == (Step(method="smoothquant"),) and recipe.weights is None
    quantize(tiny_model, recipe, calibration_ids, batch_size=4, progress=False)
    changed = [k for k, v in tiny_model.state_dict().items() if not torch.equal(v, state[k])]
    assert changed, "smoothing changed no weight"
    after = logits(tiny_model, token_ids)
    assert ((after - before).abs().max() / before.abs().max()).item() < 1e-4


@pytest.mark.parametrize("family", sorted(ALL_FOLDABLE))
def test_smoothing_every_foldable_subset_keeps_the_model(
    tiny_model, family, calibration_ids, token_ids
) -> None:
    before = logits(tiny_model, token_ids)
    quantize(tiny_model, smooth_only(subsets=ALL_FOLDABLE[family]), calibration_ids, progress=False)
    after = logits(tiny_model, token_ids)
    assert ((after - before).abs().max() / before.abs().max()).item() < 1e-4


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_scales_follow_the_formula_on_observed_statistics(tiny_model, calibration_ids) -> None:
    """Per block, s = smooth_scales(abs-max of the subset's input, abs-max of its columns)."""
    adapter = adapter_for(tiny_model)
    blocks = adapter.block_list(tiny_model)
    inputs: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for index, block in enumerate(blocks):
        for subset in adapter.subsets:
            key = (index, subset.name)
            inputs[key] = []
            handles.append(
                block.get_submodule(subset.linears[0]).register_forward_pre_hook(
                    lambda _m, args, key=key: inputs[key].append(args[0].detach())
                )
            )
    logits(tiny_model, calibration_ids)
    for handle in handles:
        handle.remove()
    expected = {}
    for index, block in enumerate(blocks):
        for subset in adapter.subsets:
            if subset.prev_kind != "norm":
                continue
            act = torch.cat(inputs[(index, subset.name)]).reshape(-1, 64).abs().amax(dim=0)
            linears = [block.get_submodule(name) for name in subset.linears]
            weight = weight_input_absmax(linears, adapter.transposed_weights)
            expected[(index, subset.name)] = smooth_scales(act, weight, 0.3)

    (method,) = plan(tiny_model, smooth_only(alpha=0.3))
    assert isinstance(method, SmoothQuant) and method.alpha == 0.3
    run_blockwise(tiny_model, adapter, calibration_ids, method.apply, batch_size=3, progress=False)
    assert set(method.scales) == set(expected)
    for key, s in method.scales.items():
        torch.testing.assert_close(s, expected[key], rtol=1e-4, atol=0)


def test_needs_calibration(make_tiny_model) -> None:
    model = make_tiny_model("llama")
    state = snapshot(model)
    with pytest.raises(RecipeError, match="needs calibration data"):
        quantize(model, "smoothquant-w8a8", progress=False)
    assert_unchanged(model, state)


def test_post_ln_opt_is_refused_before_any_work(opt_post_ln, calibration_ids) -> None:
    state = snapshot(opt_post_ln)
    with pytest.raises(UnsupportedModelError, match="smoothquant cannot be applied.*post-LN"):
        plan(opt_post_ln, load_recipe("smoothquant-w8a8"))
    with pytest.raises(UnsupportedModelError, match="post-LN"):
        quantize(opt_post_ln, "smoothquant-w8a8", calibration_ids, progress=False)
    assert_unchanged(opt_post_ln, state)


def test_post_ln_opt_may_smooth_linear_subsets(opt_post_ln, calibration_ids, token_ids) -> None:
    before = logits(opt_post_ln, token_ids)
    quantize(opt_post_ln, smooth_only(subsets=["attn_out"]), calibration_ids, progress=False)
    after = logits(opt_post_ln, token_ids)
    assert ((after - before).abs().max() / before.abs().max()).item() < 1e-4


@pytest.mark.parametrize(
    ("family", "args", "message"),
    [
        ("llama", {"alpha": 1.5}, "alpha"),
        ("llama", {"subsets": []}, "subsets"),
        ("llama", {"beta": 1}, "beta"),
        ("llama", {"subsets": ["qkv"]}, "unknown subset 'qkv'.*attn_in, attn_out"),
        ("gpt2", {"subsets": ["attn_out"]}, "'attn_out' of gpt2 has no op to fold"),
        ("opt", {"subsets": ["mlp_out"]}, "'mlp_out' of opt has no op to fold"),
        ("llama", {"subsets": ["attn_in", "attn_in"]}, "more than once"),
    ],
)
def test_bad_arguments_are_clear_recipe_errors(tiny_model, args, message) -> None:
    with pytest.raises(RecipeError, match=message) as info:
        plan(tiny_model, smooth_only(**args))
    assert "\n" not in str(info.value)


def test_smoothing_after_weight_quantization_is_refused(make_tiny_model) -> None:
    recipe = load_recipe("smoothquant-w8a8").model_copy(
        update={"steps": (Step(method="rtn"), Step(method="smoothquant"))}
    )
    with pytest.raises(RecipeError, match="before weight quantization"):
        plan(make_tiny_model("llama"), recipe)


@pytest.mark.parametrize("family", ["llama", "mistral", "opt", "gpt2"])
def test_default_alpha_follows_the_model_type(tiny_model, family) -> None:
    (method, _rtn) = plan(tiny_model, load_recipe("smoothquant-w8a8"))
    assert method.alpha == DEFAULT_ALPHA[family]
    assert DEFAULT_ALPHA["opt"] == 0.5 and DEFAULT_ALPHA["llama"] == 0.85
    (explicit,) = plan(tiny_model, smooth_only(alpha=0.6))
    assert explicit.alpha == 0.6


@pytest.mark.parametrize("bits", [8, 6])
def test_presets_match_rtn_formats(bits: int) -> None:
    smooth, rtn = load_recipe(f"smoothquant-w{bits}a{bits}"), load_recipe(f"rtn-w{bits}a{bits}")
    assert (smooth.weights, smooth.activations) == (rtn.weights, rtn.activations)
    assert [step.method for step in smooth.steps] == ["smoothquant", "rtn"]
    assert smooth.bits_label() == f"W{bits}A{bits}"


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_smoothing_beats_rtn_w8a8_under_an_outlier_channel(
    make_tiny_model, family, calibration_ids, token_ids
) -> None:
    errors = {}
    for recipe in ("fp", "rtn-w8a8", "smoothquant-w8a8"):
        model = make_tiny_model(family)
        inject_outlier_channel(model)
        quantize(model, recipe, calibration_ids, progress=False)
        errors[recipe] = logits(model, token_ids)
    reference = errors.pop("fp")
    rtn = relative_error(errors["rtn-w8a8"], reference)
    smooth = relative_error(errors["smoothquant-w8a8"], reference)
    assert smooth < 0.7 * rtn, f"smoothquant {smooth:.4f} vs rtn {rtn:.4f}"
