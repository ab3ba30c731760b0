"""Specification of OutlierTune: exact symmetrization + Δ fold, integer per-channel activations."""

import copy
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, logits, relative_error, save_and_reload
from torch import nn

from channelwise.adapters import adapter_for
from channelwise.compress import plan, quantize
from channelwise.errors import NonFiniteError, RecipeError, UnsupportedModelError
from channelwise.methods.outliertune import OutlierTune, integer_quantizer, step_sizes
from channelwise.quant.activation import input_quantizer, remove_input_quantizer
from channelwise.recipe import Recipe, Step, load_recipe


def outliertune_only(bits: int = 8, **args) -> Recipe:
    """OutlierTune with activations (its Δ needs their bits) and no weight quantization."""
    recipe = load_recipe(f"rtn-w{bits}a{bits}")
    steps = (Step(method="outliertune", args=args),)
    return recipe.model_copy(update={"name": "outliertune-only", "weights": None, "steps": steps})


def reference(x_shifted: torch.Tensor, delta: torch.Tensor, bits: int) -> torch.Tensor:
    """The plain per-channel quantizer: round(X̃/Δ) clamped, times Δ."""
    q = 2 ** (bits - 1)
    return torch.clamp(torch.round(x_shifted / delta), -q, q - 1) * delta


@pytest.mark.parametrize("family", FAMILIES)
def test_symmetrization_and_delta_fold_keep_the_model(
    make_tiny_model, family, calibration_ids, token_ids
) -> None:
    model = make_tiny_model(family)
    before = logits(model, token_ids)
    quantize(model, outliertune_only(), calibration_ids, batch_size=3, progress=False)
    adapter = adapter_for(model)
    block = adapter.block_list(model)[0]
    for subset in adapter.subsets:
        quantizer = input_quantizer(block.get_submodule(subset.linears[0]))
        assert quantizer is not None
        static = quantizer.qparams is not None
        assert static == (subset.prev_kind == "norm"), subset.name
        if static:
            assert quantizer.qparams.scale.item() == 1.0 and quantizer.spec.bits == 8
    for module in model.modules():
        remove_input_quantizer(module)
    assert relative_error(logits(model, token_ids), before) < 1e-5


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_installed_quantizer_is_the_per_channel_reference(
    make_tiny_model, family, calibration_ids, token_ids
) -> None:
    bits = 6
    model = make_tiny_model(family)
    original = copy.deepcopy(model)
    q_name = adapter_for(model).subsets[0].linears[0]

    def first_input(m: nn.Module) -> torch.Tensor:
        seen = []
        linear = adapter_for(m).block_list(m)[0].get_submodule(q_name)
        handle = linear.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
        logits(m, token_ids)
        handle.remove()
        return seen[0].reshape(-1, seen[0].shape[-1])

    x = first_input(original)
    quantize(model, outliertune_only(bits), calibration_ids, batch_size=3, progress=False)
    z, delta = model.channelwise_methods[0].folded[(0, "attn_in")]
    codes = first_input(model)  # what q_proj multiplies with W·diag(Δ): X_int
    assert torch.equal(codes, codes.round()) and codes.abs().max() <= 2 ** (bits - 1)
    expected = reference(x - z, delta, bits)
    mismatch = (codes * delta - expected).abs() > 1e-4 * delta
    assert mismatch.float().mean() < 1e-3  # only ties at .5 may round differently


def test_integer_quantizer_on_adversarial_inputs() -> None:
    bits = 8
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(32, 8, generator=generator)
    x[:, 1] *= 300.0  # outlier channel
    x[:, 2] = 0.75  # constant channel
    x[:, 3] = 0.0  # zero channel
    delta = step_sizes(x.abs().amax(dim=0), bits)
    assert (delta > 0).all()
    beyond = torch.cat([x, 2 * x[:4]])  # inputs past the calibrated range saturate
    quantizer = integer_quantizer(bits)
    for inputs in (x, beyond, torch.zeros(4, 8)):
        out = quantizer(None, (inputs / delta,))[0] * delta
        assert torch.allclose(out, reference(inputs, delta, bits), rtol=0, atol=1e-6)
    assert (quantizer(None, (beyond / delta,))[0] <= 127).all()
    with pytest.raises(NonFiniteError):
        quantizer(None, (torch.full((2, 8), float("nan")),))
    with pytest.raises(RecipeError, match="NaN"):
        step_sizes(torch.tensor([1.0, float("nan")]), bits)


def test_shift_is_the_mean_of_per_sample_midpoints(make_tiny_model, calibration_ids) -> None:
    model = make_tiny_model("opt")
    original = copy.deepcopy(model)
    seen = []
    norm = original.model.decoder.layers[0].self_attn_layer_norm
    handle = norm.register_forward_hook(lambda _m, _a, out: seen.append(out))
    logits(original, calibration_ids)
    handle.remove()
    x = seen[0]  # (samples, seq, C)
    expected = ((x.amax(dim=1) + x.amin(dim=1)) / 2).mean(dim=0)
    quantize(model, outliertune_only(), calibration_ids, batch_size=4, progress=False)
    z, _delta = model.channelwise_methods[0].folded[(0, "attn_in")]
    assert torch.allclose(z, expected, atol=1e-5)
    assert not torch.allclose(z, (x.amax(dim=(0, 1)) + x.amin(dim=(0, 1))) / 2, atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_quantized_model_saves_and_loads_back(
    make_tiny_model, family, tiny_tokenizer, calibration_ids, token_ids, tmp_path: Path
) -> None:
    model = make_tiny_model(family)
    quantize(model, "outliertune-w6a6", calibration_ids, batch_size=3, progress=False)
    expected = logits(model, token_ids)
    loaded = save_and_reload(model, tiny_tokenizer, tmp_path / "out")
    assert torch.allclose(logits(loaded, token_ids), expected, atol=1e-5, rtol=1e-5)
    restored = input_quantizer(
        adapter_for(loaded)
        .block_list(loaded)[1]
        .get_submodule("mlp.c_fc" if family == "gpt2" else "mlp.up_proj")
    )
    assert restored.qparams is not None and restored.qparams.scale.item() == 1.0


def test_bad_recipes_fail_early(make_tiny_model, opt_post_ln) -> None:
    with pytest.raises(UnsupportedModelError, match="post-LN"):
        plan(opt_post_ln, load_recipe("outliertune-w8a8"))
    no_acts = load_recipe("rtn-w8a16").model_copy(update={"steps": (Step(method="outliertune"),)})
    with pytest.raises(RecipeError, match="needs an 'activations' quantizer"):
        plan(make_tiny_model("llama"), no_acts)
    after_rtn = load_recipe("rtn-w8a8").model_copy(
        update={"steps": (Step(method="rtn"), Step(method="outliertune"))}
    )
    with pytest.raises(RecipeError, match="put outliertune first"):
        plan(make_tiny_model("llama"), after_rtn)
    with pytest.raises(RecipeError, match="shift_statistic"):
        plan(make_tiny_model("llama"), outliertune_only(shift_statistic="median"))
    assert isinstance(plan(make_tiny_model("gpt2"), outliertune_only())[0], OutlierTune)
