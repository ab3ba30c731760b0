"""Attention-input quantizers: the hook is exact in float, and quantizes what it says."""

import pytest
import torch

import channelwise.quant.attention as attention
from channelwise import Recipe, quantize
from channelwise.errors import RecipeError
from channelwise.quant import PerRow, QuantSpec
from channelwise.quant.attention import AttentionQuantizers, install_attention_quantizers

TOKEN8 = {"bits": 8, "granularity": "token", "dynamic": True}


def attention_modules(model):
    from channelwise.adapters import adapter_for

    adapter = adapter_for(model)
    return [b.get_submodule(adapter.attention_module) for b in adapter.block_list(model)]


def left_padded(token_ids):
    mask = torch.ones_like(token_ids)
    mask[0, :3] = 0
    return mask


@pytest.mark.parametrize("probs", [False, True], ids=["sdpa-path", "eager-path"])
def test_hook_without_quantization_is_exact(tiny_model, token_ids, probs, monkeypatch):
    mask = left_padded(token_ids)
    with torch.no_grad():
        reference = tiny_model(token_ids, attention_mask=mask).logits
    quantizers = AttentionQuantizers()
    if probs:  # route through the explicit softmax path with an identity quantizer
        quantizers = AttentionQuantizers(probs=QuantSpec(8, False, PerRow()))
        monkeypatch.setattr(attention, "fake_quantize", lambda x, spec: x)
    install_attention_quantizers(tiny_model, attention_modules(tiny_model), quantizers)
    assert tiny_model.config._attn_implementation == "channelwise"
    with torch.no_grad():
        out = tiny_model(token_ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(out[keep], reference[keep], rtol=1e-5, atol=1e-5)


def test_greedy_generation_with_cache_matches_float(tiny_model, token_ids, monkeypatch):
    prompt = token_ids[:1, :6]
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    reference = tiny_model.generate(prompt, **settings)
    monkeypatch.setattr(attention, "fake_quantize", lambda x, spec: x)
    spec = QuantSpec(8, True, PerRow())
    install_attention_quantizers(
        tiny_model,
        attention_modules(tiny_model),
        AttentionQuantizers(q=spec, k=spec, v=spec, probs=spec),
    )
    assert torch.equal(tiny_model.generate(prompt, **settings), reference)


def test_kv8_recipe_quantizes_keys_and_values(tiny_model, token_ids):
    with torch.no_grad():
        reference = tiny_model(token_ids).logits
    recipe = Recipe.from_dict({"name": "kv8", "attention": {"k": TOKEN8, "v": TOKEN8}})
    quantize(tiny_model, recipe, progress=False)
    with torch.no_grad():
        out = tiny_model(token_ids).logits
    error = (out - reference).abs().max().item()
    assert 0 < error < 0.05 * reference.abs().max().item()
    assert recipe.bits_label() == "W16A16KV8"


def test_two_bit_keys_cost_more_than_eight(make_tiny_model, token_ids):
    errors = {}
    for bits in (8, 2):
        model = make_tiny_model("llama")
        with torch.no_grad():
            reference = model(token_ids).logits
        spec = {**TOKEN8, "bits": bits}
        quantize(model, Recipe.from_dict({"attention": {"k": spec, "v": spec}}), progress=False)
        with torch.no_grad():
            errors[bits] = (model(token_ids).logits - reference).abs().mean().item()
    assert errors[2] > 5 * errors[8]


def test_static_attention_quantizer_is_refused():
    with pytest.raises(RecipeError, match="attention.k: only dynamic"):
        Recipe.from_dict({"attention": {"k": {"bits": 8, "granularity": "tensor"}}})


def test_attention_group_must_divide_head_dim(make_tiny_model):
    model = make_tiny_model("llama")
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    recipe = Recipe.from_dict(
        {
            "name": "kvg",
            "attention": {
                "k": {
                    "bits": 4,
                    "granularity": "group",
                    "group_size": head_dim + 1,
                    "dynamic": True,
                }
            },
        }
    )
    with pytest.raises(RecipeError, match=f"head_dim {head_dim}"):
        quantize(model, recipe, progress=False)


def test_saved_attention_quantizers_come_back_on_load(make_tiny_model, token_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    from channelwise import save_quantized
    from channelwise.compress import restore_quantized

    model = make_tiny_model("llama")
    recipe = Recipe.from_dict(
        {
            "name": "w8kv4",
            "weights": {"bits": 8},
            "attention": {"k": {**TOKEN8, "bits": 4}, "v": TOKEN8},
        }
    )
    quantize(model, recipe, progress=False)
    out = save_quantized(model, None, tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    restore_quantized(loaded, out)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(token_ids).logits, model(token_ids).logits, rtol=0, atol=0
        )
