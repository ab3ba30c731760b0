"""The compiled decode loop (channelwise.deploy.decode): same tokens and scores as the eager
fake-quant model, one graph per step with the packed kernels inside it."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

from channelwise import kernels, quantize
from channelwise.deploy import pack_model
from channelwise.deploy.decode import compile_decode
from channelwise.deploy.packed import use_kernels
from channelwise.errors import ChannelwiseError
from channelwise.kernels import cpu

WIDE = dict(hidden_size=128, intermediate_size=256)  # groups of 64 fit; the W4 kernel runs


@pytest.fixture(autouse=True)
def fresh_dynamo():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def greedy(model, ids: torch.Tensor, steps: int = 6):
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
            output_scores=True, return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip
    return out.sequences, torch.stack(out.scores)


def assert_compiled_decode_matches(model, ids, expected_ids, expected_scores, counters) -> set:
    """Compile ``model``'s decode loop, generate with the kernels on, and check: the expected
    tokens, scores within 1e-4, no graph break, one graph. Returns the ops that ran."""
    before = use_kernels(True)
    try:
        compile_decode(model)
        with torch.profiler.profile() as profile:
            got_ids, got_scores = greedy(model, ids)
    finally:
        use_kernels(before)
    assert torch.equal(got_ids, expected_ids)
    torch.testing.assert_close(got_scores, expected_scores, rtol=1e-4, atol=1e-4)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # one decode step graph, reused
    return {event.key for event in profile.key_averages()}


@pytest.mark.parametrize(
    "preset, kernel",
    [
        ("rtn-w4a16-g64", "channelwise_cpu::w4a16_mm"),
        # W8A8 in the graph: dynamic int8 tokens on the small-M VNNI kernel
        ("rtn-w8a8", "channelwise_cpu::w8a8_small_mm"),
        # static per-tensor input scales, read eagerly by compile_decode: graph constants
        ("dgq-w4a8", "channelwise_cpu::w8a8_small_mm"),
        ("outliertune-w8a8", "channelwise_cpu::w8a8_small_mm"),
    ],
)
def test_compiled_decode_matches_the_fake_quant_model(
    preset, kernel, calibration_ids, fresh_dynamo
):
    model = build_tiny_model("llama", **WIDE)
    quantize(model, preset, calibration_ids, progress=False)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(7))
    expected_ids, expected_scores = greedy(model, ids)
    pack_model(model)
    ran = assert_compiled_decode_matches(model, ids, expected_ids, expected_scores, fresh_dynamo)
    assert model.generation_config.cache_implementation == "static"
    if kernels.kernel_available() and (kernel != "channelwise_cpu::w8a8_small_mm" or cpu._vnni()):
        assert kernel in ran


def test_compile_decode_refuses_a_model_that_cannot_generate():
    with pytest.raises(ChannelwiseError, match="generative transformers model"):
        compile_decode(torch.nn.Linear(4, 4))


def test_compiled_decode_runs_the_16_bit_head_of_a_float16_checkpoint(
    calibration_ids, fresh_dynamo, tmp_path
):
    from conftest import build_tiny_tokenizer

    from channelwise import load_model
    from channelwise.compress import save_quantized
    from channelwise.deploy.half import HalfLinear
    from channelwise.deploy.packed import round_float_tensors_

    model = build_tiny_model("llama", tie_word_embeddings=True, **WIDE)
    quantize(model, "rtn-w4a16-g64", calibration_ids, progress=False)
    pack_model(model)
    round_float_tensors_(model, torch.float16)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(8))
    expected_ids, expected_scores = greedy(model, ids)
    loaded, _ = load_model(save_quantized(model, build_tiny_tokenizer(), tmp_path / "out"))
    assert isinstance(loaded.lm_head, HalfLinear)
    ran = assert_compiled_decode_matches(loaded, ids, expected_ids, expected_scores, fresh_dynamo)
    if kernels.kernel_available():
        assert "channelwise_cpu::half_mm" in ran
