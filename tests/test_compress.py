"""Specification of ``quantize``, ``save_quantized`` and their restore on load."""

from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, build_tiny_tokenizer
from helpers import logits
from torch import nn
from transformers import AutoModelForCausalLM

from channelwise.adapters import adapter_for, linear_weight
from channelwise.adapters.phi3 import SplitLinear
from channelwise.compress import (
    RECIPE_ATTR,
    STATIC_QPARAMS_FILE,
    quantize,
    restore_quantized,
    save_quantized,
)
from channelwise.errors import ChannelwiseError, OutputExistsError, RecipeError
from channelwise.models import MARKER_FILE, load_model
from channelwise.paths import OUTPUT_MARKER
from channelwise.quant.activation import input_quantizer
from channelwise.recipe import QuantArgs, Recipe, Step, load_recipe

STATIC_W8A8 = Recipe(
    name="static-w8a8",
    weights=QuantArgs(bits=8, symmetric=True, granularity="channel"),
    activations=QuantArgs(bits=8, symmetric=True, granularity="tensor", dynamic=False),
    steps=(Step(method="rtn"),),
)


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every block linear of the model by its full path."""
    adapter = adapter_for(model)
    return {
        f"{adapter.blocks}.{index}.{name}": module
        for index, block in enumerate(adapter.block_list(model))
        for name, module in adapter.block_linears(block).items()
    }


def weights_out_in(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every block linear's weight as (out, in)."""
    transposed = adapter_for(model).transposed_weights
    return {
        path: linear_weight(module, transposed).clone()
        for path, module in block_linears(model).items()
    }


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# --- weights ---------------------------------------------------------------------------------


def test_rtn_w8a16_puts_every_row_on_its_own_int8_grid(tiny_model: nn.Module) -> None:
    original = weights_out_in(tiny_model)
    quantize(tiny_model, "rtn-w8a16", progress=False)
    quantized = weights_out_in(tiny_model)
    assert all(not torch.equal(quantized[p], original[p]) for p in original)
    for path, w in original.items():
        q = quantized[path]
        step = w.abs().amax(dim=1, keepdim=True) / 127  # symmetric, per output channel
        codes = q / step
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3, msg=path)
        assert codes.round().min() >= -128 and codes.round().max() <= 127, path
        assert ((q - w).abs() <= step / 2 * (1 + 1e-5) + 1e-8).all(), path
        for row in q:
            assert row.unique().numel() <= 2**8, path
        assert input_quantizer(block_linears(tiny_model)[path]) is None, "a16: no act quantizer"


@pytest.mark.parametrize(
    ("preset", "bits", "group"), [("rtn-w4a16-g64", 4, 64), ("rtn-w3a16-g64", 3, 64)]
)
def test_grouped_rtn_uses_at_most_2_to_the_bits_values_per_group(
    tiny_model: nn.Module, preset: str, bits: int, group: int
) -> None:
    original = weights_out_in(tiny_model)
    quantize(tiny_model, preset, progress=False)
    for path, q in weights_out_in(tiny_model).items():
        out_features, in_features = q.shape
        groups = q.reshape(out_features, in_features // group, group)
        for row in groups.reshape(-1, group):
            assert row.unique().numel() <= 2**bits, path
        assert not torch.equal(q, original[path]), f"{path} was not quantized"


def test_quantize_changes_only_the_block_linear_weights(tiny_model: nn.Module) -> None:
    before = snapshot(tiny_model)
    quantize(tiny_model, "rtn-w4a16-g64", progress=False)
    after = tiny_model.state_dict()
    # Phi-3's split q/k/v (gate/up) parts save under their fused linear's name.
    weight_keys = {
        f"{path.rsplit('.', 1)[0] if fused else path}.weight"
        for path in block_linears(tiny_model)
        for fused in [isinstance(tiny_model.get_submodule(path.rsplit(".", 1)[0]), SplitLinear)]
    }
    for key, value in before.items():
        if key in weight_keys:
            assert not torch.equal(after[key], value), f"{key} was not quantized"
        else:
            assert torch.equal(after[key], value), f"{key} (not a block linear weight) changed"


def test_fp_recipe_leaves_the_model_exactly_as_it_was(
    tiny_model: nn.Module, token_ids: torch.Tensor
) -> None:
    before = snapshot(tiny_model)
    reference = logits(tiny_model, token_ids)
    result = quantize(tiny_model, "fp", progress=False)
    assert result.recipe.name == "fp" and result.recipe.is_float
    assert torch.equal(logits(tiny_model, token_ids), reference)
    assert_unchanged(tiny_model, before)
    assert all(input_quantizer(m) is None for m in tiny_model.modules())


# --- activations -----------------------------------------------------------------------------


def test_rtn_w8a8_quantizes_every_block_linear_input_dynamically(
    tiny_model: nn.Module, token_ids: torch.Tensor
) -> None:
    reference = logits(tiny_model, token_ids)
    quantize(tiny_model, "rtn-w8a8", progress=False)
    linears = block_linears(tiny_model)
    for path, module in linears.items():
        quantizer = input_quantizer(module)
        assert quantizer is not None, f"{path} has no input quantizer"
        assert quantizer.qparams is None, f"{path}: per-token ranges are dynamic"
        assert quantizer.spec.bits == 8
    others = [m for m in tiny_model.modules() if all(m is not lin for lin in linears.values())]
    assert all(input_quantizer(m) is None for m in others), "only block linears are quantized"

    quantized = logits(tiny_model, token_ids)
    relative = ((quantized - reference).norm() / reference.norm()).item()
    assert 0 < relative < 0.05


def test_static_activations_without_calibration_fail_before_any_change(
    tiny_model: nn.Module, calibration_ids: torch.Tensor
) -> None:
    before = snapshot(tiny_model)
    with pytest.raises(RecipeError, match="calibration"):
        quantize(tiny_model, STATIC_W8A8, progress=False)
    assert_unchanged(tiny_model, before)
    assert all(input_quantizer(m) is None for m in tiny_model.modules())
    assert getattr(tiny_model, RECIPE_ATTR, None) is None
    quantize(tiny_model, STATIC_W8A8, calibration_ids, batch_size=4, progress=False)


def test_static_activations_store_ranges_from_calibration(
    tiny_model: nn.Module, calibration_ids: torch.Tensor, token_ids: torch.Tensor
) -> None:
    # Block 0's first linear reads the embeddings through an untouched norm: its input on the
    # calibration ids is the same before and after quantization.
    first = next(iter(block_linears(tiny_model).values()))
    seen: list[torch.Tensor] = []
    handle = first.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    logits(tiny_model, calibration_ids)
    handle.remove()
    expected_scale = torch.cat(seen).abs().max() / 127

    reference = logits(tiny_model, token_ids)
    result = quantize(tiny_model, STATIC_W8A8, calibration_ids, batch_size=4, progress=False)
    assert result.calibration_samples == 6
    for path, module in block_linears(tiny_model).items():
        quantizer = input_quantizer(module)
        assert quantizer is not None and quantizer.qparams is not None, path
        assert quantizer.qparams.scale.shape == (1, 1), f"{path}: one range per tensor"
        assert torch.isfinite(quantizer.qparams.scale).all() and quantizer.qparams.scale > 0
    torch.testing.assert_close(
        input_quantizer(first).qparams.scale.reshape(()), expected_scale, rtol=1e-6, atol=0
    )
    relative = ((logits(tiny_model, token_ids) - reference).norm() / reference.norm()).item()
    assert 0 < relative < 0.1


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_calibration_longer_than_the_positions_is_refused_before_any_change(
    make_tiny_model, family: str
) -> None:
    model = make_tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    too_long = torch.randint(0, 128, (2, 65), generator=torch.Generator().manual_seed(4))
    with pytest.raises(ChannelwiseError, match="calibration samples of 65 tokens exceed"):
        quantize(model, STATIC_W8A8, too_long, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_quantizing_twice_is_refused(tiny_model: nn.Module) -> None:
    quantize(tiny_model, "rtn-w8a16", progress=False)
    before = snapshot(tiny_model)
    with pytest.raises(ChannelwiseError, match="rtn-w8a16"):
        quantize(tiny_model, "rtn-w4a16-g64", progress=False)
    assert_unchanged(tiny_model, before)


def test_group_size_not_dividing_a_width_fails_before_any_change(tiny_model: nn.Module) -> None:
    recipe = Recipe.from_dict(
        {"name": "w4-g48", "weights": {"bits": 4, "granularity": "group", "group_size": 48}}
    )
    adapter = adapter_for(tiny_model)
    before = snapshot(tiny_model)
    with pytest.raises(RecipeError) as info:
        quantize(tiny_model, recipe, progress=False)
    message = str(info.value)
    assert "w4-g48" in message
    assert f"{adapter.blocks}.*.{adapter.linear_names()[0]}" in message
    assert "48" in message and "64" in message
    assert_unchanged(tiny_model, before)
    assert getattr(tiny_model, RECIPE_ATTR, None) is None


def test_activation_group_size_is_checked_too(make_tiny_model) -> None:
    model = make_tiny_model("llama")
    recipe = Recipe.from_dict(
        {
            "name": "a-g48",
            "weights": {"bits": 8},
            "activations": {"bits": 8, "granularity": "group", "group_size": 48, "dynamic": True},
        }
    )
    before = snapshot(model)
    with pytest.raises(RecipeError, match=r"self_attn\.q_proj.*48"):
        quantize(model, recipe, progress=False)
    assert_unchanged(model, before)


@pytest.mark.filterwarnings("ignore:A custom validator is returning a value other than")
def test_recipe_built_in_code_without_steps_still_quantizes_weights(make_tiny_model) -> None:
    model = make_tiny_model("llama")
    original = weights_out_in(model)
    quantize(model, Recipe(name="w4", weights=QuantArgs(bits=4)), progress=False)
    changed = weights_out_in(model)
    assert all(not torch.equal(changed[p], original[p]) for p in original)


@pytest.mark.parametrize("steps", [["rtn", "gptq"], ["gptq", "rtn"]])
def test_two_quantizing_steps_are_refused_before_any_change(make_tiny_model, steps) -> None:
    model = make_tiny_model("llama")
    before = weights_out_in(model)
    recipe = Recipe.from_dict(
        {"name": "twice", "weights": {"bits": 4}, "steps": [{"method": m} for m in steps]}
    )
    with pytest.raises(RecipeError, match="both quantize the weights; a recipe has one"):
        quantize(model, recipe, progress=False)
    assert all(torch.equal(weights_out_in(model)[p], before[p]) for p in before)


def test_activation_only_recipe_quantizes_inputs_and_keeps_weights(make_tiny_model) -> None:
    model = make_tiny_model("llama")
    before = snapshot(model)
    recipe = Recipe.from_dict(
        {"name": "w16a8", "activations": {"bits": 8, "granularity": "token", "dynamic": True}}
    )
    quantize(model, recipe, progress=False)
    assert_unchanged(model, before)
    assert all(input_quantizer(m) is not None for m in block_linears(model).values())


# --- save and restore ------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["rtn-w8a8", STATIC_W8A8], ids=["dynamic", "static"])
def test_saved_model_loads_back_with_identical_logits(
    tiny_model: nn.Module,
    tiny_tokenizer,
    recipe,
    tmp_path: Path,
    calibration_ids: torch.Tensor,
    token_ids: torch.Tensor,
) -> None:
    quantize(tiny_model, recipe, calibration_ids, batch_size=4, progress=False)
    expected = logits(tiny_model, token_ids)
    out = save_quantized(tiny_model, tiny_tokenizer, tmp_path / "out")
    assert out == (tmp_path / "out").resolve()
    assert (out / MARKER_FILE).is_file()
    assert (out / STATIC_QPARAMS_FILE).is_file() == (recipe is STATIC_W8A8)
    assert load_recipe(out / "recipe.yaml") == load_recipe(recipe)

    loaded, tokenizer = load_model(out)
    assert tokenizer is not None
    assert getattr(loaded, RECIPE_ATTR) == load_recipe(recipe)
    for path, module in block_linears(loaded).items():
        original = input_quantizer(tiny_model.get_submodule(path))
        restored = input_quantizer(module)
        assert restored is not None, path
        assert restored.spec == original.spec
        if original.qparams is None:
            assert restored.qparams is None
        else:
            assert torch.equal(restored.qparams.scale, original.qparams.scale)
            assert torch.equal(restored.qparams.zero_point, original.qparams.zero_point)
    assert torch.equal(logits(loaded, token_ids), expected)


def test_restore_quantized_on_a_plain_transformers_load(
    make_tiny_model, tmp_path: Path, calibration_ids: torch.Tensor, token_ids: torch.Tensor
) -> None:
    model = make_tiny_model("gpt2")
    quantize(model, STATIC_W8A8, calibration_ids, batch_size=4, progress=False)
    expected = logits(model, token_ids)
    out = save_quantized(model, None, tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not torch.equal(logits(plain, token_ids), expected), "weights alone are not enough"
    restore_quantized(plain, out)
    assert torch.equal(logits(plain, token_ids), expected)
    with pytest.raises(ChannelwiseError):
        quantize(plain, "rtn-w8a8", progress=False)  # the restored model counts as quantized


def test_restore_refuses_a_folder_missing_static_ranges(
    make_tiny_model, tmp_path: Path, calibration_ids: torch.Tensor
) -> None:
    model = make_tiny_model("llama")
    quantize(model, STATIC_W8A8, calibration_ids, batch_size=4, progress=False)
    out = save_quantized(model, None, tmp_path / "out")
    (out / STATIC_QPARAMS_FILE).unlink()
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with pytest.raises(ChannelwiseError, match="static activation ranges"):
        restore_quantized(plain, out)


def test_save_refuses_an_existing_folder_and_leaves_it_untouched(
    make_tiny_model, tmp_path: Path
) -> None:
    model = make_tiny_model("llama")
    quantize(model, "rtn-w8a16", progress=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="force"):
        save_quantized(model, None, out)
    assert folder_contents(out) == {"keep.txt": b"precious"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_save_with_force_replaces_a_folder_channelwise_wrote(
    make_tiny_model, tmp_path: Path
) -> None:
    model = make_tiny_model("llama")
    quantize(model, "rtn-w8a16", progress=False)
    out = save_quantized(model, None, tmp_path / "out")
    assert (out / OUTPUT_MARKER).is_file()
    (out / "stale.txt").write_text("old")
    save_quantized(model, None, out, force=True)
    assert not (out / "stale.txt").exists()
    assert (out / "config.json").is_file() and (out / MARKER_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temporary folders left"


@pytest.mark.parametrize("kind", ["foreign folder", "file"])
def test_save_with_force_never_replaces_what_channelwise_did_not_write(
    make_tiny_model, tmp_path: Path, kind: str
) -> None:
    model = make_tiny_model("llama")
    quantize(model, "rtn-w8a16", progress=False)
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("precious")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    before = folder_contents(tmp_path)
    with pytest.raises(OutputExistsError, match="--force replaces only"):
        save_quantized(model, None, out, force=True)
    assert folder_contents(tmp_path) == before


def test_save_with_force_fills_an_empty_folder(make_tiny_model, tmp_path: Path) -> None:
    model = make_tiny_model("llama")
    (tmp_path / "out").mkdir()
    save_quantized(model, None, tmp_path / "out", force=True)
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("target", ["source", "parent", "child"])
def test_save_never_writes_over_the_models_own_folder(
    make_tiny_model, tmp_path: Path, target: str
) -> None:
    source = tmp_path / "models" / "tiny"
    make_tiny_model("llama").save_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    quantize(model, "rtn-w8a16", progress=False)
    before = folder_contents(tmp_path)
    out = {"source": source, "parent": source.parent, "child": source / "quantized"}[target]
    with pytest.raises(OutputExistsError, match="input model"):
        save_quantized(model, None, out, force=True)
    assert folder_contents(tmp_path) == before


def test_a_model_built_from_a_config_saves_under_the_working_directory(
    make_tiny_model, tmp_path: Path, monkeypatch
) -> None:
    """Its ``name_or_path`` is "": that is no input folder (it resolved to the working
    directory, so every output below it was refused as "inside the input model")."""
    monkeypatch.chdir(tmp_path)
    model = make_tiny_model("llama")
    assert model.name_or_path == ""
    quantize(model, "rtn-w8a16", progress=False)
    assert (save_quantized(model, None, "out/q") / "config.json").is_file()


def test_a_saved_tensor_the_model_would_drop_is_refused_on_load(calibration_ids, tmp_path) -> None:
    from channelwise.errors import CheckpointError

    model = build_tiny_model("llama")
    quantize(model, "rtn-w8a16", calibration_ids, progress=False)
    q_proj = model.model.layers[0].self_attn.q_proj
    q_proj.bias = nn.Parameter(torch.ones(q_proj.out_features))  # config says: no bias
    folder = save_quantized(model, build_tiny_tokenizer(), tmp_path / "out")
    with pytest.raises(CheckpointError, match="q_proj.bias"):
        load_model(folder)
