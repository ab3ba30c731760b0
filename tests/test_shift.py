"""Specification of exact channel shifting (``channelwise.transforms.shift``)."""

from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, RMS_FAMILIES, logits, relative_error, save_and_reload
from torch import nn

from channelwise.adapters import adapter_for
from channelwise.compress import plan, quantize
from channelwise.errors import NonFiniteError, RecipeError, UnsupportedModelError
from channelwise.recipe import Recipe, Step
from channelwise.transforms import fold_scales_into_norm
from channelwise.transforms.shift import (
    enable_llama_biases,
    norm_shift,
    shift_between_linears,
    shift_norm_output,
)

PRE_LN = FAMILIES  # every tiny family is pre-LN by default


def shift_every_norm(model: nn.Module, scale_too: bool = False) -> None:
    adapter = adapter_for(model)
    generator = torch.Generator().manual_seed(3)
    for block in adapter.block_list(model):
        for subset in (s for s in adapter.subsets if s.prev_kind == "norm"):
            norm = block.get_submodule(subset.prev)
            linears = [block.get_submodule(n) for n in subset.linears]
            z = torch.randn(norm.weight.numel(), generator=generator)
            shift_norm_output(norm, linears, z, adapter.transposed_weights)
            if scale_too:
                s = torch.rand(norm.weight.numel(), generator=generator) * 4 + 0.5
                fold_scales_into_norm(norm, linears, s, adapter.transposed_weights)


@pytest.mark.parametrize("family", PRE_LN)
@pytest.mark.parametrize("scale_too", [False, True], ids=["shift", "shift+scale"])
def test_shift_into_norm_output_is_exact(make_tiny_model, family, scale_too, token_ids) -> None:
    model = make_tiny_model(family)
    before = logits(model, token_ids)
    shift_every_norm(model, scale_too)
    assert relative_error(logits(model, token_ids), before) < 1e-5
    norm = adapter_for(model).block_list(model)[0].get_submodule(adapter_for(model).subsets[0].prev)
    rms = family in RMS_FAMILIES
    assert (norm_shift(norm) is not None) == rms, "RMSNorm needs a runtime shift, LayerNorm none"


def test_shifted_norm_output_is_centred(make_tiny_model, token_ids) -> None:
    model = make_tiny_model("llama")
    norm = model.model.layers[0].input_layernorm
    seen: list[torch.Tensor] = []
    handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda _m, a: seen.append(a[0])
    )
    logits(model, token_ids)
    x = seen.pop().reshape(-1, 64)
    z = (x.amax(0) + x.amin(0)) / 2
    attn = model.model.layers[0].self_attn
    shift_norm_output(norm, [attn.q_proj, attn.k_proj, attn.v_proj], z, False)
    logits(model, token_ids)
    handle.remove()
    x = seen.pop().reshape(-1, 64)
    assert torch.allclose(x.amax(0), -x.amin(0), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_shift_through_values_into_the_output_projection_is_exact(
    make_tiny_model, family, token_ids
) -> None:
    model = make_tiny_model(family)
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = config.hidden_size // heads
    before = logits(model, token_ids)
    adapter = adapter_for(model)
    for block in adapter.block_list(model):
        v = block.get_submodule(adapter.attention["v"])
        o = block.get_submodule(adapter.attention["o"])
        z = torch.randn(kv_heads * head_dim, generator=torch.Generator().manual_seed(4))
        shift_between_linears(v, o, z, heads // kv_heads, head_dim, False)
    assert relative_error(logits(model, token_ids), before) < 1e-5


def test_llama_biases_follow_the_config_flags(make_tiny_model) -> None:
    model = make_tiny_model("llama")
    enable_llama_biases(model, adapter_for(model))
    assert model.config.attention_bias and model.config.mlp_bias
    for name in ("self_attn.o_proj", "mlp.down_proj", "self_attn.q_proj"):
        bias = model.model.layers[1].get_submodule(name).bias
        assert bias is not None and not bias.any()
    qwen = make_tiny_model("qwen2")
    enable_llama_biases(qwen, adapter_for(qwen))  # no flag exists: nothing changes
    assert qwen.model.layers[0].mlp.gate_proj.bias is None


def shift_only(shift: bool = True) -> Recipe:
    return Recipe(name="shift-only", steps=(Step(method="osplus", args={"shift": shift}),))


@pytest.mark.parametrize("family", PRE_LN)
def test_shifted_model_saves_and_loads_back(
    make_tiny_model, family, tiny_tokenizer, calibration_ids, token_ids, tmp_path: Path
) -> None:
    model = make_tiny_model(family)
    before = logits(model, token_ids)
    quantize(model, shift_only(), calibration_ids, batch_size=3, progress=False)
    expected = logits(model, token_ids)
    assert relative_error(expected, before) < 1e-5
    loaded = save_and_reload(model, tiny_tokenizer, tmp_path / "out")
    assert relative_error(logits(loaded, token_ids), expected) < 1e-6


def test_post_ln_opt_is_refused_before_any_change(opt_post_ln) -> None:
    state = {k: v.clone() for k, v in opt_post_ln.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match="post-LN"):
        plan(opt_post_ln, shift_only())
    assert all(torch.equal(v, state[k]) for k, v in opt_post_ln.state_dict().items())


def test_bad_shifts_are_refused(make_tiny_model) -> None:
    model = make_tiny_model("opt")
    block = model.model.decoder.layers[0]
    linears = [block.self_attn.q_proj]
    with pytest.raises(RecipeError, match="expected \\(64,\\)"):
        shift_norm_output(block.self_attn_layer_norm, linears, torch.zeros(63), False)
    with pytest.raises(NonFiniteError):
        shift_norm_output(
            block.self_attn_layer_norm, linears, torch.full((64,), float("nan")), False
        )
    with pytest.raises(RecipeError, match="reads 128 channels"):
        shift_norm_output(block.self_attn_layer_norm, [block.fc2], torch.zeros(64), False)
