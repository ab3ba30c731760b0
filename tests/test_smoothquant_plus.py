"""Specification of SmoothQuant+: exact smoothing, one α chosen by the quantized model's loss."""

import pytest
import torch
from helpers import FAMILIES, inject_outlier_channel, logits
from torch import nn

from channelwise.adapters import adapter_for, linear_weight
from channelwise.compress import METHODS_ATTR, plan, quantize
from channelwise.engine import run_blockwise
from channelwise.errors import RecipeError, UnsupportedModelError
from channelwise.methods.smoothquant_plus import (
    DEFAULT_ALPHAS,
    SmoothQuantPlus,
    collect_absmax,
)
from channelwise.quant import fake_quantize
from channelwise.recipe import Recipe, Step, load_recipe
from channelwise.transforms import smooth_scales, weight_input_absmax
from channelwise.transforms.subset_scales import fold_subset, foldable_subsets, head_geometry

GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def sq_plus_recipe(quantizer: str = "rtn", group_size: int = 32, **args) -> Recipe:
    args = {"alphas": GRID, **args}
    return Recipe(
        name="sq-plus-test",
        weights={"bits": 4, "symmetric": False, "granularity": "group", "group_size": group_size},
        steps=(Step(method="smoothquant_plus", args=args), Step(method=quantizer)),
    )


def max_relative(after: torch.Tensor, before: torch.Tensor) -> float:
    return ((after - before).abs().max() / before.abs().max()).item()


def reference_smooth_and_round(model: nn.Module, ids: torch.Tensor, alpha: float, spec) -> None:
    """The paper's recipe written out: abs-max from the float model, smooth every subset, RTN."""
    adapter = adapter_for(model)
    subsets = foldable_subsets(adapter)
    inputs: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for index, block in enumerate(adapter.block_list(model)):
        for subset in subsets:
            inputs[(index, subset.name)] = store = []
            handles.append(
                block.get_submodule(subset.linears[0]).register_forward_pre_hook(
                    lambda _m, args, store=store: store.append(args[0])
                )
            )
    logits(model, ids)
    for handle in handles:
        handle.remove()
    n_rep, head_dim = head_geometry(model.config)
    with torch.no_grad():
        for index, block in enumerate(adapter.block_list(model)):
            for subset in subsets:
                x = torch.cat(inputs[(index, subset.name)])
                act = x.reshape(-1, x.shape[-1]).abs().amax(0)
                linears = [block.get_submodule(name) for name in subset.linears]
                weight = weight_input_absmax(linears, adapter.transposed_weights)
                if subset.prev_kind == "grouped_heads":
                    act = act.view(-1, n_rep, head_dim).amax(1).reshape(-1)
                    weight = weight.view(-1, n_rep, head_dim).amax(1).reshape(-1)
                s = smooth_scales(act, weight, alpha)
                fold_subset(block, subset, s, adapter.transposed_weights, n_rep, head_dim)
            for module in adapter.block_linears(block).values():
                w = linear_weight(module, adapter.transposed_weights)
                w.copy_(fake_quantize(w, spec))


def hf_loss(model: nn.Module, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy as transformers computes it (labels = inputs)."""
    with torch.no_grad():
        return model(ids, labels=ids, use_cache=False).loss.item()


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothing_with_the_chosen_alpha_keeps_the_model(
    tiny_model, calibration_ids, token_ids
) -> None:
    """prepare_model restores the float weights; apply alone changes weights, not the function."""
    adapter = adapter_for(tiny_model)
    before = logits(tiny_model, token_ids)
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    method, _rtn = plan(tiny_model, sq_plus_recipe(alphas=(0.5, 0.8)))
    method.prepare_model(tiny_model, adapter, calibration_ids)
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(value, state[key]), f"the search left {key} changed"
    assert method.alpha in (0.5, 0.8) and set(method.losses) == {0.5, 0.8}
    run_blockwise(tiny_model, adapter, calibration_ids, method.apply, progress=False)
    assert any(not torch.equal(v, state[k]) for k, v in tiny_model.state_dict().items())
    assert max_relative(logits(tiny_model, token_ids), before) < 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_search_picks_the_alpha_with_the_lowest_loss(
    make_tiny_model, family, calibration_ids
) -> None:
    recipe = sq_plus_recipe(samples=4)
    spec = recipe.weights.spec("weight")
    ids = calibration_ids[:4]
    explicit = {}
    for alpha in GRID:
        model = make_tiny_model(family)
        inject_outlier_channel(model, factor=30.0)
        reference_smooth_and_round(model, ids, alpha, spec)
        explicit[alpha] = hf_loss(model, ids)
    assert len({round(v, 6) for v in explicit.values()}) > 1, "the grid must matter"

    model = make_tiny_model(family)
    inject_outlier_channel(model, factor=30.0)
    quantize(model, recipe, calibration_ids, batch_size=2, progress=False)
    method = getattr(model, METHODS_ATTR)[0]
    assert isinstance(method, SmoothQuantPlus)
    for alpha in GRID:
        assert method.losses[alpha] == pytest.approx(explicit[alpha], rel=1e-4)
    assert method.alpha == min(explicit, key=explicit.get)
    # With rtn after it, the model quantized is exactly the one the search scored.
    assert hf_loss(model, ids) == pytest.approx(explicit[method.alpha], rel=1e-4)


def test_the_search_shows_its_progress_bar_only_when_asked(
    make_tiny_model, calibration_ids, capfd
) -> None:
    shown = {}
    for progress in (False, True):
        recipe = sq_plus_recipe(samples=2, alphas=(0.0, 0.5))
        quantize(make_tiny_model("llama"), recipe, calibration_ids[:2], progress=progress)
        shown[progress] = "smoothquant_plus α" in capfd.readouterr().err
    assert shown == {False: False, True: True}


def test_abs_max_statistics_cover_every_smoothable_subset(make_tiny_model, calibration_ids) -> None:
    model = make_tiny_model("mistral")
    adapter = adapter_for(model)
    stats = collect_absmax(model, adapter, calibration_ids, batch_size=4)
    assert len(stats) == 2
    assert set(stats[0]) == {"attn_in", "attn_out", "mlp_in", "mlp_out"}
    assert stats[0]["mlp_out"].shape == (128,) and (stats[0]["attn_in"] > 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_runs_with_rtn_or_gptq_on_every_foldable_family(
    make_tiny_model, family, calibration_ids, token_ids
) -> None:
    for quantizer in ("rtn", "gptq"):
        model = make_tiny_model(family)
        quantize(model, sq_plus_recipe(quantizer, alphas=(0.0, 0.5)), calibration_ids,
                 progress=False)  # fmt: skip
        assert getattr(model, METHODS_ATTR)[0].alpha in (0.0, 0.5)
        assert torch.isfinite(logits(model, token_ids)).all()


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (Recipe(name="r", weights=sq_plus_recipe().weights,
                steps=(Step(method="smoothquant_plus"),)), "follow it with a quantizing step"),
        (sq_plus_recipe().model_copy(
            update={"steps": (Step(method="rtn"), Step(method="smoothquant_plus"))}),
         "must come before weight quantization"),
        (sq_plus_recipe().model_copy(
            update={"steps": (Step(method="smoothquant"), Step(method="smoothquant_plus"),
                              Step(method="rtn"))}),
         "must be the first step"),
        (Recipe(name="r", steps=(Step(method="smoothquant_plus"), Step(method="gptq"))),
         "'weights' quantizer"),
        (sq_plus_recipe(group_size=48), "group size 48 does not divide 64"),
        (sq_plus_recipe(alphas=(0.5, 1.5)), "alpha must be in"),
        (sq_plus_recipe(alphas=()), "alphas"),
        (sq_plus_recipe(samples=0), "samples"),
    ],
)  # fmt: skip
def test_bad_recipes_fail_before_any_change(make_tiny_model, recipe, message) -> None:
    with pytest.raises(RecipeError, match=message) as info:
        plan(make_tiny_model("llama"), recipe)
    assert "\n" not in str(info.value)


def test_needs_calibration(make_tiny_model) -> None:
    with pytest.raises(RecipeError, match="needs calibration data"):
        quantize(make_tiny_model("llama"), sq_plus_recipe(), progress=False)


def test_post_ln_opt_is_refused(opt_post_ln, calibration_ids) -> None:
    with pytest.raises(UnsupportedModelError, match="smoothquant_plus cannot be applied.*post-LN"):
        quantize(opt_post_ln, sq_plus_recipe(), calibration_ids, progress=False)


def test_presets() -> None:
    rtn, gptq = load_recipe("rtn-w4a16-g64"), load_recipe("gptq-w4a16-g64")
    plus = load_recipe("smoothquant_plus-w4a16-g64")
    assert [s.method for s in plus.steps] == ["smoothquant_plus", "rtn"]
    assert plus.weights == rtn.weights
    plus_gptq = load_recipe("smoothquant_plus-gptq-w4a16-g64")
    assert [s.method for s in plus_gptq.steps] == ["smoothquant_plus", "gptq"]
    assert plus_gptq.steps[1] == gptq.steps[0] and plus_gptq.weights == gptq.weights
    assert DEFAULT_ALPHAS[0] == 0.0 and DEFAULT_ALPHAS[-1] == 1.0 and len(DEFAULT_ALPHAS) == 21
