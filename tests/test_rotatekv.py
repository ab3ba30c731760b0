"""RotateKV: the pre-RoPE key rotation and V/O fold are exact, the reorder is the calibrated
sort, sinks stay float, and unsupported models or arguments are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_kvcache import FloatCodec, left_padded

from channelwise.compress import quantize, save_quantized
from channelwise.errors import KVCacheError, RecipeError
from channelwise.evaluate import perplexity
from channelwise.kvcache import KVCacheConfig, chunked_perplexity, make_cache
from channelwise.kvcache.rotatekv import PreRopeRotation, default_group_size
from channelwise.models import load_model
from channelwise.recipe import Recipe
from channelwise.transforms.hadamard import hadamard_matrix


def rotatekv(**args) -> Recipe:
    text = ", ".join(f"{k}: {v}" for k, v in {"bits": 4, **args}.items())
    return Recipe.from_yaml(f"name: rkv\nkv_cache: {{method: rotatekv, args: {{{text}}}}}")


def test_pre_rope_rotation_round_trips(make_tiny_model):
    model = make_tiny_model("llama")
    orders = [torch.randperm(32), torch.randperm(32)]
    t = PreRopeRotation(model.model.rotary_emb, hadamard_matrix(32), orders)
    keys = torch.randn(2, 7, 16)
    positions = torch.arange(3, 10)
    stored = t.to_stored(keys, 1, positions)
    assert not torch.allclose(stored, keys)
    torch.testing.assert_close(t.from_stored(stored, 1, positions), keys, rtol=1e-5, atol=1e-5)


def test_stored_key_is_the_rotated_reordered_pre_rope_key(make_tiny_model, token_ids):
    """k′ = P·H·k_pre, with k_pre taken straight from k_proj."""
    model = make_tiny_model("llama")
    order = torch.randperm(32)
    t = PreRopeRotation(model.model.rotary_emb, hadamard_matrix(32), [order, order])
    attn = model.model.layers[0].self_attn
    grabbed = {}
    attn.k_proj.register_forward_hook(lambda m, a, out: grabbed.setdefault("pre", out))
    recorder = make_cache(model, KVCacheConfig(FloatCodec(), FloatCodec()))
    with torch.no_grad():
        model(token_ids[:1, :6], cache=recorder, use_cache=True)
    post = FloatCodec().decode(recorder.layers[0].sequences[0].keys)  # (heads, 6, d), post-RoPE
    stored = t.to_stored(post, 0, torch.arange(6))
    pre = grabbed["pre"][0]  # (6, 32)
    expected = (pre @ hadamard_matrix(32).float().T)[:, order]
    got = stored.transpose(0, 1).reshape(6, 32)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_vo_fold_and_key_rotation_are_exact_before_quantization(make_tiny_model, token_ids):
    model = make_tiny_model("llama")
    fp = perplexity(model, token_ids, progress=False)
    quantize(model, rotatekv(), token_ids, progress=False)
    assert perplexity(model, token_ids, progress=False) == pytest.approx(fp, rel=1e-5)
    rotation = make_cache(model).config.key_transform
    exact = KVCacheConfig(FloatCodec(), FloatCodec(), key_transform=rotation, sinks=3)
    got = chunked_perplexity(model, token_ids, exact, chunk=5, progress=False)
    assert got == pytest.approx(fp, rel=1e-5)


def test_reorder_sorts_the_signed_sums_of_rotated_pre_rope_keys(make_tiny_model, token_ids):
    model = make_tiny_model("llama")
    sums = []
    for layer in model.model.layers:
        layer.self_attn.k_proj.register_forward_hook(
            lambda m, a, out: sums.append(out.reshape(-1, 32) @ hadamard_matrix(32).float().T)
        )
    with torch.no_grad():
        model(token_ids)
    expected = [s.sum(0).argsort(stable=True) for s in sums]
    model = make_tiny_model("llama")
    quantize(model, rotatekv(), token_ids, progress=False)
    orders = make_cache(model).config.key_transform.orders
    for got, want in zip(orders, expected, strict=True):
        assert torch.equal(got, want)


def test_sink_tokens_stay_float(make_tiny_model, token_ids):
    model = make_tiny_model("llama")
    quantize(model, rotatekv(bits=2, sinks=1), token_ids, progress=False)
    ids = token_ids[:1, :8]
    embedding = model.get_input_embeddings().weight
    original = embedding[ids[0, 5]].clone()
    with torch.no_grad():
        embedding[ids[0, 5], 3] = 500.0  # a massive activation on token 5
    cache = make_cache(model)
    recorder = make_cache(model, KVCacheConfig(FloatCodec(), FloatCodec()))
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        model(ids, cache=recorder, use_cache=True)
        embedding[ids[0, 5]] = original
    seq = cache.layers[0].sequences[0]
    assert seq.sink_index.tolist() == [5] and seq.encoded == 7
    keys, values = seq.read(cache.config, (2, 0, 16), torch.float32, "cpu", 0)
    exact_keys = FloatCodec().decode(recorder.layers[0].sequences[0].keys)
    assert torch.equal(keys[:, 5], exact_keys[:, 5])
    assert not torch.allclose(keys[:, 4], exact_keys[:, 4])
    with torch.no_grad():
        model(token_ids[:1, 8:9], cache=cache, use_cache=True)  # decode: quantized, sinks stay
    assert seq.sink_index.tolist() == [5] and seq.encoded == 8


def test_rotatekv_batch_composition_does_not_change_outputs(make_tiny_model, token_ids):
    model = make_tiny_model("llama")
    quantize(model, rotatekv(bits=4, sinks=2), token_ids, progress=False)
    short, long = token_ids[0, :7], token_ids[1, :16]
    ids, mask = left_padded(short, long)
    alone = model.generate(
        short[None], max_new_tokens=10, do_sample=False, pad_token_id=0, cache=make_cache(model)
    )[0, 7:]
    batched = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=10,
        do_sample=False,
        pad_token_id=0,
        cache=make_cache(model),
    )[0, 16:]
    assert torch.equal(alone, batched)


def test_rotatekv_survives_save_and_load(make_tiny_model, tiny_tokenizer, token_ids, tmp_path):
    model = make_tiny_model("llama")
    quantize(model, rotatekv(bits=2), token_ids, progress=False)
    before = chunked_perplexity(model, token_ids, chunk=4, progress=False)
    loaded, _ = load_model(str(save_quantized(model, tiny_tokenizer, tmp_path / "r")), device="cpu")
    after = chunked_perplexity(loaded, token_ids, chunk=4, progress=False)
    assert after == pytest.approx(before, rel=1e-6)


def test_non_contiguous_positions_are_refused(make_tiny_model, token_ids):
    model = make_tiny_model("llama")
    quantize(model, rotatekv(), token_ids, progress=False)
    cache = make_cache(model)
    with torch.no_grad():
        model(token_ids[:1, :4], cache=cache, use_cache=True)
        with pytest.raises(KVCacheError, match="contiguous"):
            model(
                token_ids[:1, 4:6],
                position_ids=torch.tensor([[9, 10]]),
                cache=cache,
                use_cache=True,
            )


@pytest.mark.parametrize(
    ("overrides", "args", "match"),
    [
        ({}, {"group_heads": 3}, "group_heads 3 does not divide the 2 KV heads"),
        ({"head_dim": 14}, {}, "no Hadamard matrix of size 14"),
        ({}, {"group_size": 24}, "group_size 24 does not divide the 32"),
    ],
)
def test_unsupported_rotatekv_settings_are_refused(make_tiny_model, overrides, args, match):
    model = make_tiny_model("llama", **overrides)
    weight = model.model.layers[0].self_attn.v_proj.weight.clone()
    with pytest.raises(RecipeError, match=match):
        quantize(model, rotatekv(**args), torch.zeros(1, 4, dtype=torch.long), progress=False)
    assert torch.equal(model.model.layers[0].self_attn.v_proj.weight, weight)


def test_rotatekv_needs_rope_and_calibration(make_tiny_model, token_ids):
    with pytest.raises(RecipeError, match="Llama-family"):
        quantize(make_tiny_model("gpt2"), rotatekv(), token_ids, progress=False)
    with pytest.raises(RecipeError, match="calibration"):
        quantize(make_tiny_model("llama"), rotatekv(), progress=False)


def test_default_group_size_is_the_largest_divisor_up_to_128():
    assert default_group_size(192) == 96
    assert default_group_size(256) == 128
    assert default_group_size(32) == 32


def test_rotatekv_presets_label(tmp_path: Path):
    from channelwise.recipe import load_recipe

    assert load_recipe("rotatekv-kv2").bits_label() == "W16A16KV2"
    assert load_recipe("rotatekv-kv4").bits_label() == "W16A16KV4"
