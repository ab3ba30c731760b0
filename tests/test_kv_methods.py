"""KV-cache methods from recipes: kivi and kv_bfp presets, K-sort exactness, composition with
weight recipes, save/load, the compare column, and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_kvcache import FloatCodec

from channelwise.compare import compare
from channelwise.compress import quantize, save_quantized
from channelwise.errors import KVCacheError, RecipeError
from channelwise.evaluate import perplexity
from channelwise.kvcache import KVCacheConfig, chunked_perplexity, make_cache
from channelwise.kvcache.methods import ChannelOrder, ksort_order
from channelwise.models import load_model
from channelwise.protocol import Protocol
from channelwise.recipe import Recipe, load_recipe
from channelwise.report import format_markdown, format_table


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("kivi-kv4", "W16A16KV4"),
        ("kivi-kv2", "W16A16KV2"),
        ("kv_bfp", "W16A16KV4bfp"),
        ("rotatekv-kv4", "W16A16KV4"),
        ("rotatekv-kv2", "W16A16KV2"),
        ("cskv-50", "W16A16KV16"),
        ("cskv-50-kv4", "W16A16KV4"),
    ],
)
def test_kv_preset_labels_and_round_trip(name, label):
    recipe = load_recipe(name)
    assert recipe.bits_label() == label and not recipe.is_float and recipe.steps == ()
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


BFP16 = Recipe.from_yaml("name: bfp16\nkv_cache: {method: kv_bfp, args: {block: 16}}")


def test_ksort_orders_rope_pairs_together_by_joint_norm():
    head_dim, kv_heads = 8, 2
    w = torch.zeros(kv_heads * head_dim, 3)
    norms = torch.tensor([5.0, 1.0, 3.0, 2.0, 0.5, 4.0, 0.1, 7.0])  # pairs (i, i+4)
    w[:head_dim, 0] = norms.sqrt()
    w[head_dim:, 1] = norms.flip(0).sqrt()
    order = ksort_order(w, kv_heads, rope_pairs=True)
    # joint pair norms for head 0: (0,4) 5.5, (1,5) 5, (2,6) 3.1, (3,7) 9 → ascending 2,1,0,3
    assert order[0].tolist() == [2, 6, 1, 5, 0, 4, 3, 7]
    assert sorted(order[1].tolist()) == list(range(head_dim))
    plain = ksort_order(w, kv_heads, rope_pairs=False)
    assert plain[0].tolist() == norms.argsort().tolist()


def test_channel_order_round_trips_exactly():
    orders = [torch.stack([torch.randperm(16), torch.randperm(16)]) for _ in range(2)]
    transform = ChannelOrder(orders)
    keys = torch.randn(2, 5, 16)
    stored = transform.to_stored(keys, 1)
    assert torch.equal(stored[0], keys[0][:, orders[1][0]])
    assert torch.equal(transform.from_stored(stored, 1), keys)


def test_ksort_with_a_float_codec_is_exact(make_tiny_model, token_ids):
    """The transform alone (no rounding) leaves the model's outputs unchanged."""
    model = make_tiny_model("llama")
    quantize(model, BFP16, progress=False)
    ksort = make_cache(model).config.key_transform
    assert ksort is not None
    config = KVCacheConfig(FloatCodec(), FloatCodec(), key_transform=ksort)
    expected = perplexity(model, token_ids, progress=False)
    got = chunked_perplexity(model, token_ids, config, chunk=4, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("preset", ["kivi-kv4", "kivi-kv2", "kv_bfp"])
def test_kv_presets_build_a_cache_that_generates(make_tiny_model, token_ids, preset):
    model = make_tiny_model("llama", head_dim=32)  # the presets' 32-channel blocks fit
    result = quantize(model, preset, progress=False)
    assert result.recipe.kv_cache is not None
    cache = make_cache(model)
    out = model.generate(
        token_ids[:2, :6], max_new_tokens=40, do_sample=False, pad_token_id=0, cache=cache
    )
    assert out.shape == (2, 46)
    assert cache.nbytes() < cache.float16_nbytes()


def test_sorting_helps_block_floating_point_on_outlier_channels(make_tiny_model, token_ids):
    model = make_tiny_model("llama", head_dim=32)  # four 8-channel blocks per head
    rows = [h * 32 + c for h in range(2) for c in (1, 2, 17, 18)]  # two RoPE pairs per head
    with torch.no_grad():  # a few key channels with large W_k rows, as real models have
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight[rows] *= 30
    bfp8 = Recipe.from_yaml("kv_cache: {method: kv_bfp, args: {block: 8}}")
    quantize(model, bfp8, progress=False)
    config = make_cache(model).config
    recorder = make_cache(model, KVCacheConfig(FloatCodec(), FloatCodec()))
    with torch.no_grad():
        model(token_ids, cache=recorder, use_cache=True)
    codec, ksort = config.key_codec, config.key_transform
    for layer in range(2):
        for seq in recorder.layers[layer].sequences:
            keys = FloatCodec().decode(seq.keys)  # the post-RoPE keys the cache was given
            plain = codec.decode(codec.encode(keys))
            stored = codec.decode(codec.encode(ksort.to_stored(keys, layer)))
            normal = torch.ones(32, dtype=torch.bool)
            normal[[1, 2, 17, 18]] = False  # the error that sorting removes is on these
            sorted_error = (ksort.from_stored(stored, layer) - keys)[..., normal].norm()
            # unsorted, 12 normal channels share a block with an outlier; sorted, 4 do
            assert sorted_error < 0.75 * (plain - keys)[..., normal].norm()


def test_kv_cache_composes_with_a_weight_recipe(
    make_tiny_model, tiny_tokenizer, token_ids, tmp_path: Path
):
    recipe = Recipe.from_yaml(
        "name: w4-kv4\n"
        "weights: {bits: 4, symmetric: false, granularity: group, group_size: 16}\n"
        "kv_cache: {method: kivi, args: {bits: 4, group_size: 16, residual: 16}}\n"
    )
    assert recipe.bits_label() == "W4A16KV4 g16"
    model = make_tiny_model("llama")
    quantize(model, recipe, progress=False)
    before = chunked_perplexity(model, token_ids, chunk=4, progress=False)
    out = save_quantized(model, tiny_tokenizer, tmp_path / "saved")
    loaded, _ = load_model(str(out), device="cpu")
    after = chunked_perplexity(loaded, token_ids, chunk=4, progress=False)
    assert after == pytest.approx(before, rel=1e-5)
    assert make_cache(loaded).config == make_cache(model).config


@pytest.mark.parametrize(
    ("yaml", "match"),
    [
        ("kv_cache: {method: kivy, args: {bits: 4}}", "unknown kv_cache method 'kivy'.*kivi"),
        ("kv_cache: {method: kivi, args: {bits: 9}}", "kivi.*bits"),
        ("kv_cache: {method: kivi, args: {bits: 4, residual: 20}}", "multiple of group_size"),
        (
            "kv_cache: {method: kivi, args: {bits: 4, group_size: 24, residual: 24}}",
            "do not divide",
        ),
        ("kv_cache: {method: kv_bfp, args: {block: 12}}", "do not divide the head dimension"),
    ],
)
def test_bad_kv_recipes_are_refused_before_any_change(make_tiny_model, yaml, match):
    model = make_tiny_model("llama")
    weight = model.model.layers[0].self_attn.k_proj.weight.clone()
    with pytest.raises(RecipeError, match=match):
        quantize(model, Recipe.from_yaml(yaml), progress=False)
    assert torch.equal(model.model.layers[0].self_attn.k_proj.weight, weight)


def test_ksort_refuses_fused_qkv_families(make_tiny_model):
    with pytest.raises(RecipeError, match="gpt2 is not supported.*sort: false"):
        quantize(make_tiny_model("gpt2"), BFP16, progress=False)
    unsorted = Recipe.from_yaml("kv_cache: {method: kv_bfp, args: {block: 16, sort: false}}")
    quantize(make_tiny_model("gpt2"), unsorted, progress=False)


@pytest.mark.parametrize("family", ["gpt2", "opt", "gpt_neox", "qwen2"])
def test_kivi_runs_on_every_family(make_tiny_model, token_ids, family):
    model = make_tiny_model(family)
    recipe = Recipe.from_yaml(
        "kv_cache: {method: kivi, args: {bits: 4, group_size: 8, residual: 8}}"
    )
    quantize(model, recipe, progress=False)
    fp = perplexity(model, token_ids, progress=False)
    kv = chunked_perplexity(model, token_ids, chunk=8, progress=False)
    assert kv != fp and abs(kv / fp - 1) < 0.05


def test_make_cache_on_a_float_model_without_config(make_tiny_model):
    with pytest.raises(KVCacheError):
        make_cache(make_tiny_model("llama"))


def test_compare_reports_the_kv_bytes_column(make_tiny_model, tiny_tokenizer, tmp_path: Path):
    model_dir = tmp_path / "tiny"
    make_tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    text = tmp_path / "eval.txt"
    ids = torch.randint(1, 128, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    text.write_text(" ".join(f"t{i}" for i in ids))
    protocol = Protocol(
        calib_data=str(text.with_name("calib.txt")),
        eval_data=str(text),
        seqlen=32,
        windows=2,
        start=0,
        calib_samples=2,
    )
    text.with_name("calib.txt").write_text(" ".join(f"t{i}" for i in reversed(ids)))
    kv = Recipe.from_yaml(
        "name: kv4\nkv_cache: {method: kivi, args: {bits: 4, group_size: 8, residual: 8}}"
    )
    rows = compare([kv], str(model_dir), protocol, progress=False, device="cpu", kv_chunk=8)
    assert [row.recipe for row in rows] == ["fp", "kv4"]
    assert rows[0].kv_ratio is None
    # 4-bit codes (0.5 B) + a float16 scale and minimum per 8 values (0.5 B) vs 2 B
    assert rows[1].kv_ratio == pytest.approx(0.5)
    assert rows[1].ppl != rows[0].ppl
    assert "| `kv4` | W16A16KV4 | 16.00 |" in format_markdown(rows)
    assert "—" in format_table(rows)
