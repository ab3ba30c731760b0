"""Specification of the QuaRot step: an exact rotation, then W4A4 that survives outliers."""

import pytest
import torch
from helpers import logits, relative_error
from torch import nn

from channelwise.adapters import adapter_for
from channelwise.compress import plan, quantize, save_quantized
from channelwise.errors import RecipeError, UnsupportedModelError
from channelwise.methods.quarot import apply_quarot
from channelwise.models import load_model
from channelwise.quant.activation import input_quantizer
from channelwise.quant.granularity import PerRow
from channelwise.recipe import Recipe, Step, load_recipe
from channelwise.transforms.rotate import OnlineHadamard, online_hadamard

ODD = dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
# 92 has no Hadamard order here; 2 heads of 46 keep RoPE's halves even.
NO_HADAMARD = dict(hidden_size=92, num_attention_heads=2, num_key_value_heads=1)
VARIANTS = [
    ("llama", {}),
    ("qwen2", {}),
    ("mistral", {}),
    ("llama", ODD),
    ("llama", {**ODD, "tie_word_embeddings": True}),
]
IDS = ["llama", "qwen2", "mistral", "llama-48", "llama-48-tied"]


def with_steps(preset: str, *steps: Step) -> Recipe:
    return load_recipe(preset).model_copy(update={"steps": steps})


def scale_norms(model: nn.Module, seed: int = 5) -> None:
    """Non-trivial RMSNorm scales (tiny models start at γ = 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("norm"):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))


@pytest.mark.parametrize(("family", "overrides"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("rotation", ["hadamard", "random"])
def test_rotation_alone_keeps_the_float_model(
    make_tiny_model, family, overrides, rotation, token_ids
) -> None:
    model = make_tiny_model(family, **overrides)
    scale_norms(model)
    before = logits(model, token_ids)
    apply_quarot(model, adapter_for(model), seed=1, rotation=rotation)
    assert relative_error(logits(model, token_ids), before) < 1e-5
    for layer in model.model.layers:
        assert isinstance(online_hadamard(layer.mlp.down_proj), OnlineHadamard)
        assert isinstance(online_hadamard(layer.self_attn.o_proj), OnlineHadamard)


def test_random_rotation_serves_widths_without_a_hadamard(make_tiny_model, token_ids) -> None:
    model = make_tiny_model("llama", **NO_HADAMARD)
    refused = with_steps("quarot-rtn-w4a4", Step(method="quarot"), Step(method="rtn"))
    with pytest.raises(RecipeError, match=r"92 \(hidden\).*rotation: random; set online_o: false"):
        plan(model, refused)
    args = {"rotation": "random", "online_o": False}
    plan(model, with_steps("quarot-rtn-w4a4", Step(method="quarot", args=args), Step(method="rtn")))
    before = logits(model, token_ids)
    apply_quarot(model, adapter_for(model), rotation="random", online_o=False)
    assert relative_error(logits(model, token_ids), before) < 1e-5


@pytest.mark.parametrize(("family", "overrides"), [VARIANTS[0], VARIANTS[4]], ids=IDS[::4])
@pytest.mark.parametrize("preset", ["quarot-rtn-w4a4", "quarot-w4a4"])
def test_saved_quarot_model_reloads_with_its_online_hadamards(
    make_tiny_model, family, overrides, preset, calibration_ids, token_ids, tiny_tokenizer, tmp_path
) -> None:
    model = make_tiny_model(family, **overrides)
    scale_norms(model)
    quantize(model, preset, calibration_ids, batch_size=3, progress=False)
    down = model.model.layers[0].mlp.down_proj
    hooks = list(down._forward_pre_hooks.values())
    assert isinstance(hooks[0], OnlineHadamard) and hooks[1] is input_quantizer(down)
    expected = logits(model, token_ids)
    loaded, _ = load_model(save_quantized(model, tiny_tokenizer, tmp_path / "q"), device="cpu")
    for layer in loaded.model.layers:
        hooks = list(layer.mlp.down_proj._forward_pre_hooks.values())
        assert isinstance(hooks[0], OnlineHadamard) and len(hooks) == 2
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.allclose(logits(loaded, token_ids), expected, atol=1e-5)


def plant_outlier_channels(model: nn.Module, channels=(3, 17, 40), factor: float = 40.0) -> None:
    """Scale a few channels of every norm's output by ``factor`` and divide the readers' columns
    by it: the same function, with activation outliers as LLMs have them."""
    adapter = adapter_for(model)
    with torch.no_grad():
        for block in adapter.block_list(model):
            for subset in adapter.subsets:
                if subset.prev_kind == "norm":
                    block.get_submodule(subset.prev).weight[list(channels)] *= factor
                    for name in subset.linears:
                        block.get_submodule(name).weight[:, list(channels)] /= factor


def test_quarot_rescues_w4a4_from_outlier_channels(make_tiny_model, token_ids) -> None:
    errors = {}
    for preset in ("rtn-w4a4", "quarot-rtn-w4a4"):
        model = make_tiny_model("llama")
        plant_outlier_channels(model)
        before = logits(model, token_ids)
        quantize(model, preset, progress=False)
        errors[preset] = relative_error(logits(model, token_ids), before)
    assert errors["quarot-rtn-w4a4"] < 0.5 * errors["rtn-w4a4"], errors


@pytest.mark.parametrize(
    ("preset", "quantizer"), [("quarot-w4a4", "gptq"), ("quarot-rtn-w4a4", "rtn")]
)
def test_presets_follow_the_papers_w4a4_setting(preset, quantizer) -> None:
    recipe = load_recipe(preset)
    assert [step.method for step in recipe.steps] == ["quarot", quantizer]
    weights, acts = recipe.weights.spec("weight"), recipe.activations.spec("activation")
    assert (weights.bits, weights.symmetric, weights.granularity) == (4, True, PerRow())
    assert (acts.bits, acts.symmetric, acts.granularity, acts.clip_ratio) == (
        4,
        True,
        PerRow(),
        0.9,
    )
    assert recipe.activations.dynamic and recipe.attention is None
    if quantizer == "gptq":
        assert recipe.steps[1].args.get("act_order") is True


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ((Step(method="quarot"),), "follow it with a quantizing step"),
        ((Step(method="rtn"), Step(method="quarot")), "before weight quantization"),
        ((Step(method="quarot"), Step(method="quarot"), Step(method="rtn")), "once"),
    ],
)
def test_misplaced_quarot_is_refused(tiny_model, steps, message) -> None:
    with pytest.raises(RecipeError, match=message):
        plan(tiny_model, with_steps("quarot-rtn-w4a4", *steps))


@pytest.mark.parametrize("args", [{"rotation": "qr"}, {"seed": -1}, {"online": True}])
def test_bad_arguments_are_refused(make_tiny_model, args) -> None:
    recipe = with_steps("quarot-rtn-w4a4", Step(method="quarot", args=args), Step(method="rtn"))
    with pytest.raises(RecipeError, match="step 'quarot'"):
        plan(make_tiny_model("llama"), recipe)


@pytest.mark.parametrize("family", ["opt", "gpt2", "gpt_neox"])
def test_layernorm_families_are_refused_before_any_change(tiny_model, family) -> None:
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match="RMSNorm"):
        quantize(tiny_model, "quarot-rtn-w4a4", progress=False)
    assert all(torch.equal(v, state[k]) for k, v in tiny_model.state_dict().items())


@pytest.mark.slow
def test_rotating_smollm2_keeps_its_logits() -> None:
    """SmolLM2-135M: hidden 576 = 36·16, MLP 1536 = 12·128, head_dim 64, tied embeddings."""
    model, tokenizer = load_model(device="cpu")
    ids = tokenizer("It is a truth universally acknowledged", return_tensors="pt").input_ids
    before = logits(model, ids)
    apply_quarot(model, adapter_for(model))
    assert relative_error(logits(model, ids), before) < 1e-4
