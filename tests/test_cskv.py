"""CSKV: the bi-branch cache rebuilds keys and values from low-rank features (exactly at full
rank), holds the bytes it claims, survives save/load, and refuses what it cannot do."""

from __future__ import annotations

import pytest
import torch
from test_kvcache import FloatCodec

from channelwise.compress import KV_METHOD_ATTR, quantize, save_quantized
from channelwise.errors import KVCacheError, RecipeError
from channelwise.evaluate import perplexity
from channelwise.kvcache import KVCacheConfig, chunked_perplexity, make_cache
from channelwise.models import load_model
from channelwise.recipe import Recipe

IDS = torch.randint(0, 128, (3, 48), generator=torch.Generator().manual_seed(5))


def cskv(**args) -> Recipe:
    text = ", ".join(f"{k}: {v}" for k, v in args.items())
    return Recipe.from_yaml(f"name: cskv\nkv_cache: {{method: cskv, args: {{{text}}}}}")


def test_full_rank_factors_rebuild_the_model_exactly(make_tiny_model):
    model = make_tiny_model("llama")
    fp = perplexity(model, IDS, progress=False)
    quantize(model, cskv(density_k=1.0, density_v=1.0, steps=0), IDS, progress=False)
    shrink = make_cache(model).config.shrink
    exact = KVCacheConfig(FloatCodec(), FloatCodec(), residual=8, shrink=shrink)
    got = chunked_perplexity(model, IDS, exact, chunk=8, progress=False)
    assert got == pytest.approx(fp, rel=1e-4)


def test_older_tokens_hold_features_and_the_window_holds_full_states(make_tiny_model):
    model = make_tiny_model("llama")
    quantize(model, cskv(density_k=0.5, density_v=0.5, steps=20), IDS, progress=False)
    cache = make_cache(model)
    with torch.no_grad():
        model(IDS[:1, :40], cache=cache, use_cache=True)
    seq = cache.layers[1].sequences[0]
    assert seq.keys.tokens == 32 and seq.keys.head_dim == 16  # rank 0.5 · 16 · 2 KV heads
    assert seq.residual_keys.shape == (2, 8, 16)  # the unfilled window, in full
    # features in float16 (2 B) for 32 tokens × 16 ranks × (K, V), plus the float32 window
    window = 2 * 8 * 2 * 16 * 4 + 2 * 8 * 16 * 4  # K and V, and their features
    assert seq.nbytes() == 2 * 32 * 16 * 2 + window


def test_cskv_costs_less_than_plain_low_rank_before_fine_tuning(make_tiny_model):
    fp_model = make_tiny_model("llama")
    fp = perplexity(fp_model, IDS, progress=False)
    results = {}
    for steps in (0, 200):
        model = make_tiny_model("llama")
        quantize(model, cskv(density_k=0.5, density_v=0.5, steps=steps), IDS, progress=False)
        results[steps] = chunked_perplexity(model, IDS, chunk=8, progress=False)
        reports = getattr(model, KV_METHOD_ATTR).reports
        assert all(r["loss_final"] <= r["loss_init"] for r in reports)
    assert abs(results[200] - fp) <= abs(results[0] - fp)


def test_quantized_features_generate_and_survive_save_load(
    make_tiny_model, tiny_tokenizer, tmp_path
):
    model = make_tiny_model("llama")
    quantize(model, cskv(density_k=0.5, density_v=0.5, bits=4, steps=10), IDS, progress=False)
    out = model.generate(
        IDS[:2, :6], max_new_tokens=40, do_sample=False, pad_token_id=0, cache=make_cache(model)
    )
    assert out.shape == (2, 46)
    before = chunked_perplexity(model, IDS, chunk=8, progress=False)
    loaded, _ = load_model(str(save_quantized(model, tiny_tokenizer, tmp_path / "c")), device="cpu")
    assert chunked_perplexity(loaded, IDS, chunk=8, progress=False) == pytest.approx(before)


def test_cskv_refusals(make_tiny_model):
    with pytest.raises(RecipeError, match="Llama family"):
        quantize(make_tiny_model("gpt2"), cskv(), IDS, progress=False)
    with pytest.raises(RecipeError, match="calibration"):
        quantize(make_tiny_model("llama"), cskv(), progress=False)
    with pytest.raises(RecipeError, match="window"):
        cskv_recipe = cskv(window=20)
        quantize(make_tiny_model("llama"), cskv_recipe, IDS, progress=False)
    with pytest.raises(KVCacheError, match="density"):
        quantize(make_tiny_model("llama"), cskv(density_k=0.01), IDS, progress=False)
    with pytest.raises(KVCacheError, match="shrinking"):
        KVCacheConfig(FloatCodec(), FloatCodec(), key_transform=object(), shrink=object())
