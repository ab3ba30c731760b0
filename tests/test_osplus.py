"""Specification of Outlier Suppression+ (``osplus``): exact shift + scale, searched threshold."""

from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, RMS_FAMILIES, logits, relative_error, save_and_reload

from channelwise.compress import plan, quantize
from channelwise.errors import RecipeError, UnsupportedModelError
from channelwise.methods.osplus import (
    OSPlus,
    osplus_scales,
    search_threshold,
    threshold_grid,
)
from channelwise.quant.activation import remove_input_quantizer
from channelwise.recipe import Recipe, Step, load_recipe


def osplus_only(**args) -> Recipe:
    return Recipe(name="osplus-only", steps=(Step(method="osplus", args=args),))


def quantized_search(bits: int) -> Recipe:
    """Quantizers for the search's loss, but only the osplus step: weights stay float."""
    recipe = load_recipe(f"rtn-w{bits}a{bits}")
    return recipe.model_copy(update={"name": "osplus-search", "steps": (Step(method="osplus"),)})


@pytest.mark.parametrize("family", FAMILIES)
def test_shift_and_scale_alone_keep_the_model(
    make_tiny_model, family, calibration_ids, token_ids
) -> None:
    model = make_tiny_model(family)
    before = logits(model, token_ids)
    quantize(model, quantized_search(4), calibration_ids, batch_size=3, progress=False)
    for module in model.modules():
        remove_input_quantizer(module)  # the recipe's activation quantizers: not under test
    assert relative_error(logits(model, token_ids), before) < 1e-5
    method: OSPlus = model.channelwise_methods[0]
    per_block = 3 if family in RMS_FAMILIES else 2  # + up → down for Llama
    assert len(method.searches) == per_block * 2
    for t, candidates, losses, s in method.searches.values():
        assert (s >= 1).all(), "OS+ only scales channels down"
        assert (s > 1).any(), "some channel exceeds the threshold at 4 bits"
        assert t == candidates[int(torch.argmin(losses))].item()
        assert losses.max() > losses.min(), "the loss must depend on t"


def test_without_quantizers_every_candidate_reproduces_the_float_output(
    make_tiny_model, calibration_ids
) -> None:
    model = make_tiny_model("qwen2")
    quantize(model, osplus_only(), calibration_ids, batch_size=3, progress=False)
    for _t, _candidates, losses, _s in model.channelwise_methods[0].searches.values():
        assert losses.max() < 1e-9, "shift + scale inside the loss must be exact"


def test_threshold_search_picks_the_lowest_measured_loss() -> None:
    candidates = threshold_grid(40.0, -35.0, 1.0, 200)
    table = torch.rand(len(candidates), generator=torch.Generator().manual_seed(5))
    lookup = {float(t): float(v) for t, v in zip(candidates, table, strict=True)}
    best, losses = search_threshold(candidates, lambda t: lookup[t])
    explicit_best, explicit_loss = None, float("inf")
    for t in candidates.tolist():
        if lookup[t] < explicit_loss:
            explicit_best, explicit_loss = t, lookup[t]
    assert best == explicit_best
    assert torch.equal(losses, table.double())


def test_threshold_grid_follows_the_paper() -> None:
    grid = threshold_grid(10.0, -30.0, 1.0, 10_000)
    assert grid[0] == 30.0 and len(grid) == 100  # num = max(100, int(10 / 0.5))
    assert grid[-1] > 1.0 and (grid.diff() < 0).all()
    assert len(threshold_grid(300.0, -2.0, 0.1, 10_000)) == 600
    assert len(threshold_grid(300.0, -2.0, 0.1, 150)) == 150
    assert threshold_grid(0.5, -0.2, 1.0, 100).tolist() == [0.5]


def test_scales_are_at_least_one_and_bound_the_range() -> None:
    cmx = torch.tensor([10.0, 0.5, 3.0, 0.0])
    cmn = torch.tensor([-10.0, -0.5, -1.0, 0.0])
    s = osplus_scales(cmx, cmn, 2.0)
    assert torch.equal(s, torch.tensor([5.0, 1.0, 1.5, 1.0]))
    assert ((cmx / s) <= 2.0).all() and ((cmn / s) >= -2.0).all()


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_quantized_model_saves_and_loads_back(
    make_tiny_model, family, tiny_tokenizer, calibration_ids, token_ids, tmp_path: Path
) -> None:
    model = make_tiny_model(family)
    quantize(model, "osplus-w8a8", calibration_ids, batch_size=3, progress=False)
    expected = logits(model, token_ids)
    loaded = save_and_reload(model, tiny_tokenizer, tmp_path / "out")
    assert torch.allclose(logits(loaded, token_ids), expected, atol=1e-5, rtol=1e-5)
    again = save_and_reload(loaded, tiny_tokenizer, tmp_path / "again")  # state saved again
    assert torch.allclose(logits(again, token_ids), expected, atol=1e-5, rtol=1e-5)


def test_llama_without_shift_is_scale_only(make_tiny_model, calibration_ids, token_ids) -> None:
    model = make_tiny_model("llama")
    before = logits(model, token_ids)
    quantize(model, osplus_only(shift=False), calibration_ids, batch_size=3, progress=False)
    assert model.model.layers[0].self_attn.q_proj.bias is None
    assert not model.config.attention_bias
    assert relative_error(logits(model, token_ids), before) < 1e-5


def test_up_down_scaling_is_exact_and_optional(make_tiny_model, calibration_ids, token_ids) -> None:
    model = make_tiny_model("llama")
    recipe = quantized_search(4).model_copy(
        update={"steps": (Step(method="osplus", args={"scale_down_proj": False}),)}
    )
    quantize(model, recipe, calibration_ids, batch_size=3, progress=False)
    assert (1, "mlp_out") not in model.channelwise_methods[0].searches
    model = make_tiny_model("llama")
    before = logits(model, token_ids)
    quantize(model, quantized_search(4), calibration_ids, batch_size=3, progress=False)
    for module in model.modules():
        remove_input_quantizer(module)
    assert relative_error(logits(model, token_ids), before) < 1e-5
    searches = model.channelwise_methods[0].searches
    assert (searches[(1, "mlp_out")][3] >= 1).all()
    assert model.model.layers[0].mlp.down_proj.bias is not None  # zeros: Llama's mlp_bias flag
    assert not model.model.layers[0].mlp.down_proj.bias.any()


def test_bad_recipes_fail_early(make_tiny_model, opt_post_ln) -> None:
    with pytest.raises(UnsupportedModelError, match="post-LN"):
        plan(opt_post_ln, load_recipe("osplus-w8a8"))
    after_rtn = load_recipe("rtn-w8a8").model_copy(
        update={"steps": (Step(method="rtn"), Step(method="osplus"))}
    )
    with pytest.raises(RecipeError, match="put osplus first"):
        plan(make_tiny_model("llama"), after_rtn)
    with pytest.raises(RecipeError, match="migration_samples"):
        plan(make_tiny_model("llama"), osplus_only(migration_samples=0))
    with pytest.raises(RecipeError, match="alpha: Extra inputs"):
        plan(make_tiny_model("llama"), osplus_only(alpha=0.5))
    with pytest.raises(RecipeError, match="scale_down_proj needs an up_proj"):
        plan(make_tiny_model("opt"), osplus_only(scale_down_proj=True))
