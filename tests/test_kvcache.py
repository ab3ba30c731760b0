"""Compressed KV cache: codecs against loop references, the Cache mechanics, padding invariance."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from channelwise.errors import KVCacheError, NonFiniteError
from channelwise.evaluate import perplexity
from channelwise.kvcache import (
    BFPCodec,
    Encoded,
    GroupQuantCodec,
    KVCacheConfig,
    KVCodec,
    chunked_perplexity,
    kv_bytes,
    make_cache,
)

HEADS, HEAD_DIM = 2, 16


class FloatCodec(KVCodec):
    """Stores the chunk as it is: isolates the cache's bookkeeping from any rounding."""

    def __init__(self, token_multiple: int = 1) -> None:
        self.token_multiple = token_multiple
        self.per_token = token_multiple == 1

    def encode(self, x):
        return Encoded({"x": x.transpose(0, 1).clone()}, x.shape[0], x.shape[1], x.shape[2])

    def decode(self, enc, dtype=torch.float32):
        return enc.tensors["x"].transpose(0, 1).to(dtype)


def kv_chunk(case: str, tokens: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(HEADS, tokens, HEAD_DIM, generator=gen)
    if case == "outliers":
        x[0, :, 3] *= 40  # an outlier channel, as keys have
        x[1, 5 % tokens, :] = 90.0  # an outlier token
    elif case == "offset":
        x[:, :, 7] += 25.0
    elif case == "constant":
        x[:, :, 2] = 1.5
        x[1, 3, :] = -0.75
    elif case == "zeros":
        x = torch.zeros_like(x)
    return x


def reference_group_quant(x: torch.Tensor, bits: int, group: int, axis: str, clip: float = 1.0):
    """Loop over blocks of the (tokens, heads·head_dim) view: q = round((x − lo)/s), q·s + lo."""
    rows = x.transpose(0, 1).reshape(x.shape[1], -1)
    out = torch.empty_like(rows)
    qmax = 2**bits - 1
    br, bc = (group, 1) if axis == "token" else (1, group)
    for i in range(0, rows.shape[0], br):
        for j in range(0, rows.shape[1], bc):
            block = rows[i : i + br, j : j + bc]
            lo, hi = block.min() * clip, block.max() * clip
            scale = ((hi - lo) / qmax).half().float()
            lo = lo.half().float()
            scale = scale if scale > 0 else torch.tensor(1.0)
            q = torch.clamp(torch.round((block - lo) / scale), 0, qmax)
            out[i : i + br, j : j + bc] = q * scale + lo
    return out.reshape(x.shape[1], x.shape[0], x.shape[2]).transpose(0, 1)


CASES = ["random", "outliers", "offset", "constant", "zeros"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    ("axis", "group"), [("token", 32), ("token", 16), ("channel", 16), ("channel", 32)]
)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_group_codec_matches_loop_reference(case, axis, group, bits):
    x = kv_chunk(case)
    codec = GroupQuantCodec(bits, group, axis)
    enc = codec.encode(x)
    expected = reference_group_quant(x, bits, group, axis)
    torch.testing.assert_close(codec.decode(enc), expected, rtol=0, atol=1e-5)


def test_group_codec_clip_ratio_matches_reference():
    x = kv_chunk("outliers")
    codec = GroupQuantCodec(2, 16, "channel", clip_ratio=0.8)
    expected = reference_group_quant(x, 2, 16, "channel", clip=0.8)
    torch.testing.assert_close(codec.decode(codec.encode(x)), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("bits", "axis"), [(2, "token"), (4, "channel"), (3, "channel")])
def test_group_codec_really_packs(bits, axis):
    x = kv_chunk("random")
    enc = GroupQuantCodec(bits, 32, axis).encode(x)
    channels = HEADS * HEAD_DIM
    assert enc.tensors["codes"].dtype == torch.uint8
    assert enc.tensors["codes"].shape == (64, math.ceil(channels * bits / 8))
    assert enc.tensors["scale"].dtype == torch.float16
    blocks = (64 // 32) * channels if axis == "token" else 64 * (channels // 32)
    assert enc.nbytes == 64 * math.ceil(channels * bits / 8) + blocks * 2 * 2


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_encoded_chunks_concatenate_like_one_chunk(axis):
    codec = GroupQuantCodec(4, 16, axis)
    x = kv_chunk("outliers")
    joined = codec.encode(x[:, :32]).cat(codec.encode(x[:, 32:]))
    whole = torch.cat(
        [codec.decode(codec.encode(x[:, :32])), codec.decode(codec.encode(x[:, 32:]))], 1
    )
    assert joined.tokens == 64
    assert torch.equal(codec.decode(joined), whole)


def test_group_codec_refuses_what_it_cannot_encode():
    with pytest.raises(KVCacheError, match="multiple of 32 tokens"):
        GroupQuantCodec(2, 32, "token").encode(kv_chunk("random", tokens=20))
    with pytest.raises(KVCacheError, match="does not divide the 32 channels"):
        GroupQuantCodec(2, 24, "channel").encode(kv_chunk("random"))
    x = kv_chunk("random")
    x[0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteError):
        GroupQuantCodec(4, 16, "channel").encode(x)


def reference_bfp(x: torch.Tensor, block: int, mantissa_bits: int) -> torch.Tensor:
    """Per block: the smallest power-of-two step whose rounded maximum fits the magnitude bits."""
    rows = x.transpose(0, 1).reshape(x.shape[1], -1)
    out = torch.empty_like(rows)
    top = 2 ** (mantissa_bits - 1) - 1
    for i in range(rows.shape[0]):
        for j in range(0, rows.shape[1], block):
            b = rows[i, j : j + block]
            amax = b.abs().max().item()
            if amax == 0:
                out[i, j : j + block] = 0
                continue
            k = -130
            while round(amax / 2.0**k) > top:  # Python's round is half-to-even too
                k += 1
            while k > -126 and round(amax / 2.0 ** (k - 1)) <= top:
                k -= 1
            out[i, j : j + block] = torch.round(b / 2.0**k).clamp(-top, top) * 2.0**k
    return out.reshape(x.shape[1], x.shape[0], x.shape[2]).transpose(0, 1)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block", [16, 32])
def test_bfp_codec_matches_loop_reference(case, block):
    x = kv_chunk(case, tokens=8)
    codec = BFPCodec(block=block)
    enc = codec.encode(x)
    torch.testing.assert_close(codec.decode(enc), reference_bfp(x, block, 4), rtol=0, atol=0)
    assert enc.tensors["exponent"].dtype == torch.uint8
    assert enc.nbytes == 8 * HEADS * HEAD_DIM // 2 + 8 * (HEADS * HEAD_DIM // block)


@pytest.mark.parametrize("scale", [1e30, 1e-30, 7.5, 0.5])
def test_bfp_extreme_magnitudes_and_power_of_two_edges(scale):
    x = kv_chunk("random", tokens=4) * scale
    x[0, 0, 0] = 7.5 * scale  # a maximum on a rounding edge
    codec = BFPCodec()
    y = codec.decode(codec.encode(x))
    torch.testing.assert_close(y, reference_bfp(x, 32, 4), rtol=0, atol=0)
    assert torch.isfinite(y).all()


def test_bfp_rejects_nan():
    x = kv_chunk("random")
    x[1, 1, 1] = float("inf")
    with pytest.raises(NonFiniteError):
        BFPCodec().encode(x)


# --- the cache -------------------------------------------------------------------------------


def float_config(residual: int = 0, unit: int = 1) -> KVCacheConfig:
    return KVCacheConfig(FloatCodec(unit), FloatCodec(1), residual=residual)


KIVI4 = KVCacheConfig(GroupQuantCodec(4, 8, "token"), GroupQuantCodec(4, 16, "channel"), 8)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox"])
@pytest.mark.parametrize(("residual", "unit"), [(0, 1), (8, 8), (16, 8)])
def test_float_codec_cache_reproduces_the_model(make_tiny_model, token_ids, family, residual, unit):
    model = make_tiny_model(family)
    with torch.no_grad():
        expected = model(token_ids).logits
        cache = make_cache(model, float_config(residual, unit))
        got = torch.cat(
            [
                model(token_ids[:, c : c + 5], cache=cache, use_cache=True).logits
                for c in (0, 5, 10, 15)
            ],
            dim=1,
        )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_chunked_perplexity_of_a_float_cache_equals_perplexity(make_tiny_model, token_ids):
    model = make_tiny_model("llama")
    expected = perplexity(model, token_ids, progress=False)
    got = chunked_perplexity(model, token_ids, float_config(8, 8), chunk=4, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)


def test_compressed_cache_costs_a_little_quality(make_tiny_model, token_ids):
    model = make_tiny_model("llama")
    fp = perplexity(model, token_ids, progress=False)
    kv4 = chunked_perplexity(model, token_ids, KIVI4, chunk=8, progress=False)
    kv2 = chunked_perplexity(
        model,
        token_ids,
        KVCacheConfig(GroupQuantCodec(2, 8, "token"), GroupQuantCodec(2, 16, "channel"), 8),
        chunk=8,
        progress=False,
    )
    assert kv4 != fp  # the cache really rounds what the model reads
    assert abs(kv4 - fp) < abs(kv2 - fp)


def test_residual_tokens_stay_float_until_a_unit_fills(make_tiny_model, token_ids):
    model = make_tiny_model("llama")
    cache = make_cache(model, KIVI4)
    with torch.no_grad():
        model(token_ids[:1, :13], cache=cache, use_cache=True)
    seq = cache.layers[0].sequences[0]
    assert seq.keys.tokens == 8 and seq.residual_keys.shape[1] == 5
    assert cache.get_seq_length() == 13


def test_generate_with_a_compressed_cache(make_tiny_model, token_ids):
    model = make_tiny_model("llama")
    plain = model.generate(token_ids[:2, :6], max_new_tokens=10, do_sample=False, pad_token_id=0)
    same = model.generate(
        token_ids[:2, :6],
        max_new_tokens=10,
        do_sample=False,
        pad_token_id=0,
        cache=make_cache(model, float_config(8, 8)),
    )
    assert torch.equal(plain, same)
    cache = make_cache(model, KIVI4)
    out = model.generate(
        token_ids[:2, :6], max_new_tokens=10, do_sample=False, pad_token_id=0, cache=cache
    )
    assert out.shape == (2, 16)
    assert cache.get_seq_length() == 15  # the last token is produced, never fed back


def left_padded(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(a.numel(), b.numel())
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, seq in enumerate((a, b)):
        ids[i, width - seq.numel() :] = seq
        mask[i, width - seq.numel() :] = 1
    return ids, mask


@pytest.mark.parametrize(
    "config", [KIVI4, KVCacheConfig(BFPCodec(16), BFPCodec(16))], ids=["kivi", "bfp"]
)
def test_outputs_do_not_depend_on_batch_composition(make_tiny_model, token_ids, config):
    model = make_tiny_model("llama")
    short, long = token_ids[0, :7], token_ids[1, :16]
    ids, mask = left_padded(short, long)
    with torch.no_grad():
        alone_cache = make_cache(model, config)
        alone = model(short[None], cache=alone_cache, use_cache=True).logits[0]
        batch_cache = make_cache(model, config)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # as generate numbers padded rows
        batched = model(
            ids, attention_mask=mask, position_ids=positions, cache=batch_cache, use_cache=True
        ).logits[0, -7:]
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)
    a = alone_cache.layers[1].sequences[0]
    b = batch_cache.layers[1].sequences[0]
    assert b.pads == 9 and b.stored == a.stored == 7
    new_alone = model.generate(
        short[None],
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=0,
        cache=make_cache(model, config),
    )[0, 7:]
    new_batched = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=0,
        cache=make_cache(model, config),
    )[0, 16:]
    assert torch.equal(new_alone, new_batched)


def test_right_padding_and_4d_masks_are_refused(make_tiny_model, token_ids):
    model = make_tiny_model("llama")
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 6:] = 0
    with pytest.raises(KVCacheError, match="left padding only"):
        model(
            token_ids[:2, :8], attention_mask=mask, cache=make_cache(model, KIVI4), use_cache=True
        )
    with pytest.raises(KVCacheError, match="2-D attention_mask"):
        make_cache(model, KIVI4).begin_forward(torch.ones(2, 1, 8, 8))


def test_bytes_held_are_the_packed_sizes(make_tiny_model, token_ids):
    model = make_tiny_model("llama")
    held, fp16 = kv_bytes(model, token_ids[:1], KIVI4, chunk=5)
    layers, tokens, channels = 2, 16, HEADS * HEAD_DIM
    key = tokens * channels // 2 + (tokens // 8) * channels * 4
    value = tokens * channels // 2 + tokens * (channels // 16) * 4
    assert held == layers * (key + value)
    assert fp16 == layers * 2 * tokens * channels * 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"residual": 0}, "set residual to a multiple of 8"),
        ({"residual": 12}, "not a multiple"),
        ({"residual": -1}, "≥ 0"),
    ],
)
def test_bad_cache_configs_are_refused(kwargs, match):
    with pytest.raises(KVCacheError, match=match):
        KVCacheConfig(GroupQuantCodec(4, 8, "token"), GroupQuantCodec(4, 16, "channel"), **kwargs)


def test_make_cache_without_a_config_says_what_to_do(make_tiny_model):
    with pytest.raises(KVCacheError, match="kv_cache recipe"):
        make_cache(make_tiny_model("llama"))


def test_dynamic_cache_is_untouched_by_the_hook(make_tiny_model, token_ids):
    model = make_tiny_model("llama")
    make_cache(model, KIVI4)  # installs the pre-hook
    with torch.no_grad():
        expected = model(token_ids).logits
        cache = DynamicCache(config=model.config)
        got = torch.cat(
            [
                model(token_ids[:, :9], cache=cache).logits,
                model(token_ids[:, 9:], cache=cache).logits,
            ],
            1,
        )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_float16_codec_stores_half_precision(case):
    from channelwise.kvcache.codecs import Float16Codec

    x = kv_chunk(case)
    enc = Float16Codec().encode(x)
    assert enc.nbytes == x.numel() * 2
    assert torch.equal(Float16Codec().decode(enc), x.half().float())
    x[0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        Float16Codec().encode(x)
