"""Specification of recipes: presets, validation with one-line messages, YAML round trips."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from channelwise.errors import RecipeError
from channelwise.methods import build_method, method_names
from channelwise.quant import PerColumn, PerGroup, PerRow, PerTensor
from channelwise.recipe import QuantArgs, Recipe, Step, load_recipe, preset_names

EXPECTED_PRESETS = {
    "fp": None,  # no quantizer: its label is not a bit-width
    "rtn-w8a8": "W8A8",
    "rtn-w8a16": "W8A16",
    "rtn-w6a6": "W6A6",
    "rtn-w4a16-g64": "W4A16 g64",
    "rtn-w4a16-g128": "W4A16 g128",
    "rtn-w3a16-g64": "W3A16 g64",
    "rtn-w4a8-g64": "W4A8 g64",
    "rtn-w4a4": "W4A4",
}


def one_line_error(text: str, origin: str = "bad.yaml") -> str:
    with pytest.raises(RecipeError) as info:
        Recipe.from_yaml(text, origin=origin)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(origin), message
    return message


# --- presets ---------------------------------------------------------------------------------


def test_expected_presets_exist() -> None:
    assert set(EXPECTED_PRESETS) <= set(preset_names())


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_round_trips_through_yaml(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.description
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert Recipe.from_dict(recipe.model_dump(mode="json")) == recipe


@pytest.mark.parametrize(("name", "label"), EXPECTED_PRESETS.items())
def test_preset_bit_widths(name: str, label: str | None) -> None:
    recipe = load_recipe(name)
    if label is None:
        assert recipe.is_float and recipe.steps == ()
    else:
        assert recipe.bits_label() == label
        assert [step.method for step in recipe.steps] == ["rtn"]


def test_weight_and_activation_granularities_of_w4a8_g64() -> None:
    recipe = load_recipe("rtn-w4a8-g64")
    weights = recipe.weights.spec("weight")
    assert (weights.bits, weights.symmetric) == (4, False)
    assert weights.granularity == PerGroup(64, "input")
    acts = recipe.activations.spec("activation")
    assert (acts.bits, acts.symmetric, recipe.activations.dynamic) == (8, True, True)
    assert acts.granularity == PerRow()  # per token


def test_channel_granularity_is_read_by_role() -> None:
    args = QuantArgs(bits=8, granularity="channel")
    assert args.spec("weight").granularity == PerRow()  # per output channel
    assert args.spec("activation").granularity == PerColumn()  # per input channel
    assert QuantArgs(bits=8, granularity="tensor").spec("activation").granularity == PerTensor()


def test_load_recipe_reads_a_yaml_file_and_passes_a_recipe_through(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nweights: {bits: 6, granularity: channel}\n")
    recipe = load_recipe(path)
    assert recipe.name == "mine" and recipe.weights.bits == 6
    assert load_recipe(recipe) is recipe


def test_recipes_are_immutable() -> None:
    recipe = load_recipe("rtn-w8a8")
    with pytest.raises(ValidationError, match="frozen"):
        recipe.name = "other"


# --- default step ----------------------------------------------------------------------------


def test_recipe_with_weights_and_no_steps_gets_rtn() -> None:
    recipe = Recipe.from_yaml("name: w6\nweights: {bits: 6}\n")
    assert recipe.steps == (Step(method="rtn"),)
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


def test_explicit_steps_are_kept_and_a_float_recipe_has_none() -> None:
    recipe = Recipe.from_yaml("weights: {bits: 6}\nsteps: [{method: rtn}, {method: rtn}]\n")
    assert [step.method for step in recipe.steps] == ["rtn", "rtn"]
    assert Recipe.from_yaml("name: plain\n").steps == ()


@pytest.mark.filterwarnings("ignore:A custom validator is returning a value other than")
def test_recipe_constructed_in_code_with_weights_gets_rtn() -> None:
    recipe = Recipe(name="w6", weights=QuantArgs(bits=6))
    assert recipe.steps == (Step(method="rtn"),)


# --- malformed recipes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field"),
    [
        pytest.param("weights: {bits: 1}", "weights.bits", id="bits-1"),
        pytest.param("weights: {bits: 9}", "weights.bits", id="bits-9"),
        pytest.param(
            "activations: {bits: 0, granularity: token, dynamic: true}",
            "activations.bits",
            id="activation-bits-0",
        ),
        pytest.param(
            "weights: {bits: 8, granularity: diagonal}",
            "weights.granularity",
            id="unknown-granularity",
        ),
        pytest.param(
            "weights: {bits: 4, granularity: group}", "group_size", id="group-without-group-size"
        ),
        pytest.param(
            "weights: {bits: 4, group_size: 64}", "group_size", id="group-size-without-group"
        ),
        pytest.param(
            "weights: {bits: 4, granularity: group, group_size: 0}",
            "weights.group_size",
            id="group-size-0",
        ),
        pytest.param(
            "activations: {bits: 8, granularity: token}", "dynamic", id="per-token-not-dynamic"
        ),
        pytest.param(
            "activations: {bits: 8, granularity: token, dynamic: false}",
            "dynamic",
            id="per-token-explicitly-static",
        ),
        pytest.param("weights: {bits: 8, granularity: token}", "token", id="per-token-weights"),
        pytest.param(
            "weights: {bits: 4, zero_point: float}", "symmetric: false", id="float-zero-symmetric"
        ),
        pytest.param(
            "weights: {bits: 4, scale_dtype: bfloat16}", "weights.scale_dtype", id="scale-dtype"
        ),
        pytest.param("weights: {bits: 8}\ncolour: red", "colour", id="unknown-top-level-key"),
        pytest.param("weights: {bits: 8, colour: red}", "weights.colour", id="unknown-weights-key"),
        pytest.param("steps: [{method: rtn, colour: red}]", "colour", id="unknown-step-key"),
    ],
)
def test_malformed_recipe_names_the_field_on_one_line(text: str, field: str) -> None:
    assert field in one_line_error(text)


def test_scale_dtype_and_float_minimum_reach_the_spec() -> None:
    recipe = Recipe.from_dict(
        {
            "weights": {
                "bits": 4,
                "symmetric": False,
                "granularity": "group",
                "group_size": 32,
                "zero_point": "float",
                "scale_dtype": "float16",
            }
        }
    )
    spec = recipe.weights.spec("weight")
    assert spec.float_zero and spec.scale_dtype == "float16"
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


def test_unknown_granularity_lists_the_valid_ones() -> None:
    message = one_line_error("weights: {bits: 8, granularity: diagonal}")
    assert "diagonal" in message
    for name in ("tensor", "channel", "group"):
        assert name in message


def test_out_of_range_bits_shows_the_value() -> None:
    message = one_line_error("weights: {bits: 9}")
    assert "9" in message and "8" in message


def test_a_recipe_file_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("weights: {bits: 9}\n")
    with pytest.raises(RecipeError, match="broken.yaml.*weights.bits"):
        load_recipe(path)


def test_invalid_yaml_is_a_one_line_recipe_error() -> None:
    message = one_line_error("weights: {bits: 8\nsteps: [")
    assert "YAML" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("name: x\nweights: {bits: 4}\nsteps: [{method: rtn}]\nweights: {bits: 8}\n", "weights"),
        ('{"name": "x", "weights": {"bits": 4, "bits": 8}, "steps": [{"method": "rtn"}]}', "bits"),
    ],
)
def test_a_key_given_twice_is_refused_not_overwritten(text: str, key: str) -> None:
    """Plain YAML keeps the last value: a recipe would quantize with the second ``weights``."""
    message = one_line_error(text)
    assert f"the key '{key}' is given twice" in message and "line" in message


def test_yaml_list_instead_of_mapping_is_refused() -> None:
    message = one_line_error("- weights\n- steps\n")
    assert "mapping" in message and "list" in message


def test_empty_yaml_is_refused() -> None:
    assert "mapping" in one_line_error("")


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe("rtn-w5a5")
    message = str(info.value)
    assert "\n" not in message
    assert "rtn-w5a5" in message
    for name in EXPECTED_PRESETS:
        assert name in message


def test_missing_or_binary_recipe_files_get_one_line_errors(tmp_path) -> None:
    with pytest.raises(RecipeError, match=r"recipe file .*nope\.yaml not found"):
        load_recipe(tmp_path / "nope.yaml")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00name: x")
    with pytest.raises(RecipeError, match="unreadable as UTF-8"):
        load_recipe(binary)


def test_unknown_method_names_it_and_the_registered_ones() -> None:
    recipe = Recipe.from_yaml("name: magic\nweights: {bits: 4}\nsteps: [{method: gptq-magic}]")
    with pytest.raises(RecipeError) as info:
        build_method(recipe.steps[0], recipe)
    message = str(info.value)
    assert "\n" not in message
    assert "'gptq-magic'" in message and "magic" in message
    for name in method_names():
        assert name in message
    assert "rtn" in method_names()


def test_unknown_method_argument_names_it() -> None:
    recipe = Recipe.from_yaml("weights: {bits: 4}\nsteps: [{method: rtn, args: {alpha: 0.5}}]")
    with pytest.raises(RecipeError, match="rtn.*alpha") as info:
        build_method(recipe.steps[0], recipe)
    assert "\n" not in str(info.value)


def test_rtn_without_weights_is_refused_when_checked() -> None:
    recipe = Recipe.from_yaml("steps: [{method: rtn}]")
    method = build_method(recipe.steps[0], recipe)
    with pytest.raises(RecipeError, match="weights"):
        method.check(None, None)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_a_weight_quantizing_step_without_weights_is_refused(make_tiny_model, method):
    from channelwise.compress import plan

    recipe = Recipe.from_dict({"name": "no-w", "steps": [{"method": method}]})
    with pytest.raises(RecipeError, match=f"step '{method}' needs a 'weights' quantizer"):
        plan(make_tiny_model("llama"), recipe)


@pytest.mark.parametrize(
    "name", ["../../x", "a/b", "..", ".hidden", "x\\y", "", "a" * 101, "tab\tname", "a:b"]
)
def test_recipe_names_that_are_not_plain_file_names_are_refused(name: str) -> None:
    with pytest.raises(RecipeError, match="recipe name"):
        Recipe.from_dict({"name": name})


@pytest.mark.parametrize("name", ["rtn-w4a16-g64", "smoothquant α=0.5", "awq+gptq_v2", "W8A8"])
def test_plain_recipe_names_are_accepted(name: str) -> None:
    assert Recipe.from_dict({"name": name}).name == name


def test_every_preset_name_is_a_valid_recipe_name() -> None:
    for name in preset_names():
        assert load_recipe(name).name == name
