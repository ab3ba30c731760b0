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


def test_static_attention_quantizer_must_be_per_tensor():
    with pytest.raises(RecipeError, match="attention.k: a static quantizer"):
        Recipe.from_dict({"attention": {"k": {"bits": 8, "granularity": "token"}}})
    recipe = Recipe.from_dict({"attention": {"k": {"bits": 8, "granularity": "tensor"}}})
    first, second = recipe.attention.specs(), recipe.attention.specs()
    assert isinstance(first.k, attention.StaticQuantizer) and first.k is not second.k


STATIC8 = {"bits": 8, "symmetric": False, "granularity": "tensor", "dynamic": False}


def original_k_scale(module) -> torch.Tensor:
    return attention.attention_quantizers(module).k.qparams.scale


def test_static_attention_ranges_are_calibrated_per_block_on_what_the_attention_reads(
    make_tiny_model, token_ids, tiny_tokenizer, tmp_path
):
    from helpers import save_and_reload

    model = make_tiny_model("llama")
    recipe = Recipe.from_dict({"name": "static-kv", "attention": {"k": STATIC8, "probs": STATIC8}})
    recorded = []
    real = attention.StaticQuantizer.calibrate

    def spy(self, samples):
        recorded.append(torch.cat([x.reshape(-1) for x in samples]))
        real(self, samples)

    attention.StaticQuantizer.calibrate = spy
    try:
        quantize(model, recipe, token_ids, progress=False)
    finally:
        attention.StaticQuantizer.calibrate = real
    modules = attention_modules(model)
    assert len(recorded) == 2 * len(modules)  # k and probs, once per block
    for index, module in enumerate(modules):
        quant = attention.attention_quantizers(module)
        assert quant.k.calibrated and quant.probs.calibrated
        keys = recorded[2 * index]
        expected = (keys.max() - keys.min().clamp(max=0)) / 255
        torch.testing.assert_close(quant.k.qparams.scale.reshape(()), expected)
        probs = recorded[2 * index + 1]
        assert probs.min() >= 0 and probs.max() <= 1
    assert quant_is_distinct(modules)
    with torch.no_grad():
        expected = model(token_ids, use_cache=False).logits
    loaded = save_and_reload(model, tiny_tokenizer, tmp_path / "out")
    for module, original in zip(attention_modules(loaded), modules, strict=True):
        quant = attention.attention_quantizers(module)
        torch.testing.assert_close(
            quant.k.qparams.scale, original_k_scale(original), rtol=0, atol=0
        )
        assert quant.probs.calibrated and quant.q is None
    with torch.no_grad():
        assert torch.equal(loaded(token_ids, use_cache=False).logits, expected)


def quant_is_distinct(modules) -> bool:
    entries = [attention.attention_quantizers(m).k for m in modules]
    return len({id(e) for e in entries}) == len(entries)


def test_a_methods_own_entry_survives_the_recipes_attention_quantizers():
    own = attention.LogSqrt2Quantizer(4)
    spec = QuantSpec(8, True, PerRow())
    merged = AttentionQuantizers(k=spec, probs=spec).merged_over(AttentionQuantizers(probs=own))
    assert merged.probs is own and merged.k is spec


def _log_sqrt2_reference(x: torch.Tensor, bits: int, delta: float) -> torch.Tensor:
    """Element by element, as the paper writes it."""
    import math

    out = torch.empty_like(x)
    for i, value in enumerate(x.reshape(-1).tolist()):
        if value <= 0:
            out.view(-1)[i] = 0.0
            continue
        raw = round(-2 * math.log2(value / delta))
        if raw >= 2**bits:
            out.view(-1)[i] = 0.0
            continue
        q = min(max(raw, 0), 2**bits - 1)
        out.view(-1)[i] = delta * 2 ** (-math.ceil(q / 2)) * (math.sqrt(2) if q % 2 else 1.0)
    return out


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_log_sqrt2_matches_a_plain_reference_on_random_and_adversarial_probabilities(bits):
    generator = torch.Generator().manual_seed(bits)
    probs = torch.softmax(4 * torch.randn(6, 40, generator=generator), dim=-1)
    probs[0] = 0.0  # all zero
    probs[1] = 1.0 / 40  # constant
    probs[2, :] = 1e-30  # far below the grid: flushed to zero
    probs[2, 0] = 1.0
    for delta in (1.0, float(probs.max()), 0.37):
        got = attention.log_sqrt2(probs, bits, delta)
        torch.testing.assert_close(got, _log_sqrt2_reference(probs, bits, delta))
    if bits <= 4:  # the smallest level 2^(−7.5) ≈ 0.0055: 1e-30 flushes to zero
        assert attention.log_sqrt2(probs, bits, 1.0)[2, 1:].eq(0).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_log2_shift_product_equals_the_log_sqrt2_product(bits):
    """RepQ-ViT's log2 form of the log√2 quantizer: shifts of integer values and one √2 give
    the fake-quantized probabilities times the values."""
    generator = torch.Generator().manual_seed(bits)
    probs = torch.softmax(4 * torch.randn(2, 3, 12, 40, generator=generator), dim=-1)
    probs[0, 0, 0] = 0.0  # a zero row
    probs[0, 0, 1, :] = 1e-30  # below the grid: zeros
    probs[0, 0, 1, 0] = 1.0
    values = torch.randint(-128, 128, (2, 3, 40, 16), generator=generator)
    for delta in (float(probs.max()), 0.37):
        codes = attention.log_sqrt2_codes(probs, bits, delta)
        assert codes.min() >= 0 and codes.max() <= 2**bits
        expected = attention.log_sqrt2(probs, bits, delta).double() @ values.double() / delta
        got = attention.log2_shift_matmul(codes, values, bits)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * expected.abs().max())
    assert got[0, 0, 0].eq(0).all()


def test_log2_shift_product_refuses_what_it_cannot_compute():
    from channelwise.errors import KernelInputError

    codes = torch.zeros(2, 4, dtype=torch.long)
    values = torch.zeros(4, 3, dtype=torch.long)
    refusals = {
        "8-bit codes are not supported": (codes, values, 8),
        "values must be integers, not torch.float32": (codes, values.float(), 4),
        "codes must be integers, not torch.float32": (codes.float(), values, 4),
        "do not multiply": (codes, torch.zeros(5, 3, dtype=torch.long), 4),
        "values need at least 2 dimensions": (codes, torch.zeros(4, dtype=torch.long), 4),
        r"codes must lie in \[0, 2\^4\]": (codes - 1, values, 4),
        r"got \[17, 17\]": (codes + 17, values, 4),
        "could overflow int64 at 6 bits": (codes, values + 2**29, 6),
    }
    for message, (c, v, bits) in refusals.items():
        with pytest.raises(KernelInputError, match=message):
            attention.log2_shift_matmul(c, v, bits)
    # the largest values that fit: every term at the largest shift, summed, stays in int64
    big = torch.full((4, 3), 2**29 - 1, dtype=torch.long)
    got = attention.log2_shift_matmul(codes, big, 6)
    torch.testing.assert_close(got, torch.full((2, 3), 4.0 * (2**29 - 1), dtype=torch.float64))


def test_log_sqrt2_refuses_non_finite_probabilities_and_calibrates_by_error():
    from channelwise.errors import NonFiniteError

    bad = torch.tensor([[0.5, float("nan")]])
    with pytest.raises(NonFiniteError):
        attention.log_sqrt2(bad, 4, 1.0)
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(64, 64, generator=generator), dim=-1) * 0.5  # max < 0.5
    quantizer = attention.LogSqrt2Quantizer(4)
    assert torch.equal(quantizer(probs), probs), "uncalibrated: float"
    quantizer.calibrate([probs])
    assert quantizer.delta < 0.5
    error = (quantizer(probs) - probs).square().mean()
    assert error <= (attention.log_sqrt2(probs, 4, 1.0) - probs).square().mean()


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
