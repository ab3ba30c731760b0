"""Specification of AdaDim (arXiv 2309.15531): per-IC quantization, the choice, GPTQ-ada."""

import logging

import pytest
import torch

import channelwise.methods.adadim as adadim_module  # registers 'adadim'
from channelwise.adapters import adapter_for, linear_weight
from channelwise.compress import quantize, save_quantized
from channelwise.errors import RecipeError
from channelwise.methods.adadim import AdaDim, dimension_specs, measure_point
from channelwise.models import load_model
from channelwise.quant import QuantSpec, fake_quantize
from channelwise.quant.granularity import PerColumn, PerGroup, PerRow, PerTensor
from channelwise.recipe import QuantArgs, Recipe, Step, load_recipe

W4_G16 = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(16))


def recipe(group_size: int = 32, bits: int = 4, **args) -> Recipe:
    return Recipe(
        name="adadim-test",
        weights=QuantArgs(bits=bits, symmetric=False, granularity="group", group_size=group_size),
        steps=(Step(method="adadim", args=args),),
    )


def run_adadim(monkeypatch, model, the_recipe, ids) -> AdaDim:
    """``channelwise.quantize`` with the AdaDim step it ran handed back."""
    result = quantize(model, the_recipe, ids, progress=False)
    return next(m for m in result.methods if isinstance(m, AdaDim))


def reference_per_ic(W: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    """Plain loop: every input column, every run of ``g`` output rows, asymmetric min-max."""
    Q = torch.empty_like(W)
    top = 2**bits - 1
    for j in range(W.shape[1]):
        for r in range(0, W.shape[0], g):
            w = W[r : r + g, j]
            lo, hi = min(w.min().item(), 0.0), max(w.max().item(), 0.0)
            scale = (hi - lo) / top if hi > lo else 1.0
            zero = min(max(round(-lo / scale), 0), top)
            codes = torch.clamp(torch.round(w / scale) + zero, 0, top)
            Q[r : r + g, j] = (codes - zero) * scale
    return Q


# --- per-IC quantization -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_per_ic_is_groups_of_output_channels_inside_each_input_column(seed):
    W = torch.randn(48, 24, generator=torch.Generator().manual_seed(seed))
    if seed == 2:  # adversarial: an outlier column, an outlier row, a constant column
        W[:, 3] *= 40
        W[7] *= 40
        W[:, 5] = 0.5
    specs = dimension_specs(W4_G16, "test")
    assert specs["per_ic"].granularity == PerGroup(16, "output")
    assert specs["per_oc"] == W4_G16
    torch.testing.assert_close(
        fake_quantize(W, specs["per_ic"]), reference_per_ic(W, 4, 16), rtol=1e-6, atol=1e-6
    )
    # Same parameter count: (48 × 24/16) per-OC scales vs (48/16 × 24) per-IC scales.
    assert 48 * 24 // 16 == 48 // 16 * 24


def test_either_orientation_of_the_recipe_gives_the_pair():
    per_ic = QuantSpec(3, False, PerGroup(8, "output"))
    assert dimension_specs(per_ic, "t") == {"per_oc": QuantSpec(3, False, PerGroup(8)),
                                           "per_ic": per_ic}  # fmt: skip
    channel = QuantSpec(4, False, PerRow())
    assert dimension_specs(channel, "t")["per_ic"].granularity == PerColumn()
    with pytest.raises(RecipeError, match="channel, input_channel or group"):
        dimension_specs(QuantSpec(4, False, PerTensor()), "t")


def output_errors(W: torch.Tensor, X: torch.Tensor) -> dict[str, float]:
    specs = dimension_specs(W4_G16, "test")
    return {
        choice: (X @ (W - fake_quantize(W, spec)).T).square().mean().item()
        for choice, spec in specs.items()
    }


def test_outlier_input_channel_favours_per_ic_and_outlier_rows_favour_per_oc():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(32, 32, generator=gen)
    X = torch.randn(512, 32, generator=gen)
    plain = output_errors(W, X)
    # An activation outlier channel whose weight column is small (as in LLMs: X·s, W/s).
    X_out, W_small = X.clone(), W.clone()
    X_out[:, 9] *= 50
    W_small[:, 9] /= 50
    errors = output_errors(W_small, X_out)
    assert errors["per_ic"] < 0.5 * errors["per_oc"], errors
    # Output rows of uneven size (every 4th × 10): per-IC groups take the large rows' scales.
    W_rows = W.clone()
    W_rows[::4] *= 10
    errors = output_errors(W_rows, X)
    assert errors["per_oc"] < 0.8 * errors["per_ic"], errors
    assert 0.5 < plain["per_ic"] / plain["per_oc"] < 2  # neither is special on plain weights


# --- the choice inside a model -----------------------------------------------------------------


def measure_points_of(family, make_tiny_model):
    adapter = adapter_for(make_tiny_model(family))
    return {name: measure_point(adapter, name) for name in adapter.linear_names()}


def test_errors_are_measured_at_the_attention_and_mlp_outputs(make_tiny_model):
    assert measure_points_of("llama", make_tiny_model) == {
        "self_attn.q_proj": "self_attn.o_proj",
        "self_attn.k_proj": "self_attn.o_proj",
        "self_attn.v_proj": "self_attn.o_proj",
        "self_attn.o_proj": "self_attn.o_proj",
        "mlp.gate_proj": "mlp.down_proj",
        "mlp.up_proj": "mlp.down_proj",
        "mlp.down_proj": "mlp.down_proj",
    }
    assert measure_points_of("opt", make_tiny_model)["fc1"] == "fc2"
    assert measure_points_of("gpt2", make_tiny_model)["attn.c_attn"] == "attn.c_proj"


def inject_outliers(model, factor: float = 50.0) -> None:
    """Exact rescalings (logits unchanged) that plant outliers, as trained LLMs have them.

    Block 0: input_layernorm channel 5 × factor, q/k/v input column 5 ÷ factor → q/k/v read an
    outlier input channel. Block 1: v_proj output row 3 × factor, the o_proj columns that read it
    (one per query head of KV head 0) ÷ factor → v_proj has a large output row, o_proj reads an
    outlier input channel.
    """
    with torch.no_grad():
        first, second = model.model.layers[0], model.model.layers[1]
        first.input_layernorm.weight[5] *= factor
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(first.self_attn, name).weight[:, 5] /= factor
        second.self_attn.v_proj.weight[3] *= factor
        for head in (0, 1):  # query heads 0 and 1 share KV head 0; head_dim 16
            second.self_attn.o_proj.weight[:, head * 16 + 3] /= factor


def test_sequential_choice_follows_the_injected_outliers(
    monkeypatch, make_tiny_model, calibration_ids, token_ids
):
    model = make_tiny_model("llama")
    with torch.no_grad():
        before = model(token_ids).logits
        inject_outliers(model)
        torch.testing.assert_close(model(token_ids).logits, before, rtol=1e-4, atol=1e-5)
    method = run_adadim(monkeypatch, model, recipe(16), calibration_ids)
    choices = method.choices
    for name in ("q_proj", "k_proj", "v_proj"):
        assert choices[(0, f"self_attn.{name}")] == "per_ic", method.summary()
        assert method.input_ratio[(0, f"self_attn.{name}")] > 10
    assert choices[(1, "self_attn.v_proj")] == "per_oc", method.summary()
    assert choices[(1, "self_attn.o_proj")] == "per_ic", method.summary()
    assert method.input_ratio[(1, "self_attn.o_proj")] > 10
    for key, choice in choices.items():  # the recorded winner has the lower error
        assert method.errors[key][choice] <= min(method.errors[key].values())


def test_rtn_weights_are_the_chosen_dimension_of_the_original(
    monkeypatch, family, make_tiny_model, calibration_ids, caplog
):
    model = make_tiny_model(family)
    adapter = adapter_for(model)
    blocks = adapter.block_list(model)

    def weights():
        return {
            (index, name): linear_weight(module, adapter.transposed_weights).clone()
            for index, block in enumerate(blocks)
            for name, module in adapter.block_linears(block).items()
        }

    original = weights()
    with caplog.at_level(logging.INFO, logger=adadim_module.__name__):
        method = run_adadim(monkeypatch, model, recipe(32), calibration_ids)
    after = weights()
    specs = dimension_specs(recipe(32).weights.spec("weight"), "t")
    assert set(method.choices) == set(original)
    for key, choice in method.choices.items():
        assert torch.equal(after[key], fake_quantize(original[key], specs[choice])), key
    table = method.summary()
    assert all(name in table for _, name in original)
    assert f"adadim block 1: {adapter.linear_names()[0]}=" in caplog.text


def test_errors_are_measured_on_the_first_batches_holding_error_samples_sequences(
    monkeypatch, make_tiny_model, calibration_ids
):
    seen = set()
    run_until = adadim_module._run_until

    def spy(ctx, name, want):
        seen.add(len(ctx.inputs))
        return run_until(ctx, name, want)

    monkeypatch.setattr(adadim_module, "_run_until", spy)
    quantize(make_tiny_model("opt"), recipe(32, error_samples=3), calibration_ids, batch_size=2,
             progress=False)  # fmt: skip
    assert seen == {2}  # 6 sequences in batches of 2: the first 2 batches hold 4 ≥ 3


def test_saved_model_reloads_with_the_same_logits(
    make_tiny_model, tmp_path, calibration_ids, token_ids
):
    model = make_tiny_model("gpt2")
    quantize(model, "adadim-w4a16-g64", calibration_ids, progress=False)
    with torch.no_grad():
        expected = model(token_ids).logits
    loaded, _ = load_model(save_quantized(model, None, tmp_path / "out"))
    with torch.no_grad():
        assert torch.equal(loaded(token_ids).logits, expected)


# --- GPTQ-ada ----------------------------------------------------------------------------------


def test_gptq_ada_runs_gptq_in_the_chosen_dimension(monkeypatch, make_tiny_model, calibration_ids):
    calls = []
    gptq = adadim_module.gptq_quantize

    def spy(W, H, spec, damp, block_size, act_order, static_groups, *, name):
        result = gptq(W, H, spec, damp, block_size, act_order, static_groups, name=name)
        calls.append((name, spec, act_order, static_groups, result[0]))
        return result

    monkeypatch.setattr(adadim_module, "gptq_quantize", spy)
    model = make_tiny_model("qwen2")
    the_recipe = recipe(16, bits=3, quantizer="gptq", act_order=True, static_groups=True)
    method = run_adadim(monkeypatch, model, the_recipe, calibration_ids)
    specs = dimension_specs(the_recipe.weights.spec("weight"), "t")
    assert len(calls) == len(method.choices) == 14
    assert {c for c in method.choices.values()} == {"per_oc", "per_ic"}
    for (index, linear), choice in method.choices.items():
        name, spec, act_order, static, result = next(
            c for c in calls if c[0] == f"model.layers.{index}.{linear}"
        )
        assert spec == specs[choice] and act_order and static == (choice == "per_oc")
        weight = model.model.layers[index].get_submodule(linear).weight
        assert torch.equal(weight, result.float())


def test_gptq_ada_beats_rtn_ada_on_held_out_logits(make_tiny_model):
    gen = torch.Generator().manual_seed(11)
    calibration, evaluation = (
        torch.randint(0, 128, (32, 32), generator=gen),
        torch.randint(0, 128, (8, 32), generator=gen),
    )
    with torch.no_grad():
        reference = make_tiny_model("llama")(evaluation).logits
    errors = {}
    for quantizer in ("rtn", "gptq"):
        model = make_tiny_model("llama")
        quantize(model, recipe(32, bits=3, quantizer=quantizer), calibration, progress=False)
        with torch.no_grad():
            errors[quantizer] = (model(evaluation).logits - reference).square().mean().item()
    assert errors["gptq"] < 0.9 * errors["rtn"], errors


# --- errors ------------------------------------------------------------------------------------


def test_64_groups_of_outputs_do_not_fit_a_48_row_linear_and_nothing_changes(
    make_tiny_model, calibration_ids
):
    # 8 query heads, 2 KV heads of 24: k/v_proj 48×64 (per-OC groups of 64 inputs still fit).
    model = make_tiny_model("llama", num_attention_heads=8, num_key_value_heads=2, head_dim=24)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        RecipeError,
        match=r"adadim.*PER-IC .*k_proj 48×64.*group size 64 does not divide 48 output channels",
    ):
        quantize(model, recipe(64), calibration_ids, progress=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"quantizer": "awq"}, "quantizer"),
        ({"error_samples": 0}, "error_samples"),
        ({"act_order": True}, "act_order only apply with quantizer: gptq"),
        ({"alpha": 0.5}, "alpha"),
    ],
)
def test_bad_args_are_recipe_errors(args, message, make_tiny_model, calibration_ids):
    with pytest.raises(RecipeError, match=message):
        quantize(make_tiny_model("llama"), recipe(32, **args), calibration_ids, progress=False)


def test_tensor_weights_and_missing_calibration_are_refused(make_tiny_model):
    tensor = Recipe(name="t", weights=QuantArgs(bits=4, granularity="tensor"),
                    steps=(Step(method="adadim"),))  # fmt: skip
    with pytest.raises(RecipeError, match="channel, input_channel or group"):
        quantize(make_tiny_model("llama"), tensor, torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(RecipeError, match="calibration"):
        quantize(make_tiny_model("gpt2"), "adadim-w4a16-g64", progress=False)


def test_presets():
    for name, bits in (("adadim-w4a16-g64", 4), ("adadim-gptq-w4a16-g64", 4),
                       ("adadim-gptq-w3a16-g64", 3)):  # fmt: skip
        the_recipe = load_recipe(name)
        assert the_recipe.weights.bits == bits and the_recipe.weights.group_size == 64
        assert the_recipe.steps[0].method == "adadim"
    assert load_recipe("adadim-gptq-w3a16-g64").steps[0].args["act_order"] is True
