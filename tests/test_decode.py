"""The compiled decode loop (channelwise.deploy.decode): same tokens and scores as the eager
fake-quant model, one graph per step with the packed kernels inside it."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model
from helpers import greedy_generate

from channelwise import kernels, quantize
from channelwise.deploy import pack_model
from channelwise.deploy.decode import compile_decode
from channelwise.deploy.packed import use_kernels
from channelwise.errors import ChannelwiseError, NonFiniteError
from channelwise.kernels.extension import vnni_supported

WIDE = dict(hidden_size=128, intermediate_size=256)  # groups of 64 fit; the W4 kernel runs


@pytest.fixture(autouse=True)
def fresh_dynamo():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def greedy(model, ids: torch.Tensor, steps: int = 6):
    return greedy_generate(model, ids, steps)


def assert_compiled_decode_matches(
    model, ids, expected_ids, expected_scores, counters, cpp_wrapper: bool = False, graphs=1
) -> set:
    """Compile ``model``'s decode loop, generate with the kernels on, and check: the expected
    tokens, scores within 1e-4, no graph break, ``graphs`` graphs (None: any number). Returns
    the ops that ran."""
    before = use_kernels(True)
    try:
        compile_decode(model, cpp_wrapper=cpp_wrapper)
        with torch.profiler.profile() as profile:
            got_ids, got_scores = greedy(model, ids)
    finally:
        use_kernels(before)
    assert torch.equal(got_ids, expected_ids)
    torch.testing.assert_close(got_scores, expected_scores, rtol=1e-4, atol=1e-4)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs is None or counters["stats"]["unique_graphs"] == graphs  # one step graph, reused
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
        # CHESS: the fused sparse MLP op (fixed output shape) inside the graph
        ("chess-50-w4a16-g64", "channelwise_cpu::sparse_mlp"),
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
    small_m = kernel == "channelwise_cpu::w8a8_small_mm"
    if kernels.kernel_available() and (not small_m or vnni_supported()):
        assert kernel in ran


def test_a_prompt_longer_than_small_m_compiles_on_a_w8a8_model(
    calibration_ids, fresh_dynamo, monkeypatch
):
    """The prefill of a prompt over SMALL_M tokens never asks whether the CPU has VNNI, so the
    first decode step asked it inside the graph, where dynamo refuses torch's check (the CLI's
    chat-templated prompt crashed ``generate --compile``). The answer is now fixed at import."""
    from channelwise.kernels import extension
    from channelwise.kernels.cpu import SMALL_M

    extension._state.pop("vnni", None)  # a lazy cache (the old code's) must not hide the question
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: pytest.fail("asked in the graph"))

    @torch.compile(fullgraph=True, backend="eager")
    def step(x):
        return x + 1 if extension.vnni_supported() else x - 1

    x = torch.zeros(2)
    assert torch.equal(step(x), x + 1 if extension.vnni_supported() else x - 1)
    monkeypatch.undo()
    model = build_tiny_model("llama", **WIDE)
    quantize(model, "rtn-w8a8", calibration_ids, progress=False)
    ids = torch.randint(0, 128, (1, SMALL_M + 4), generator=torch.Generator().manual_seed(3))
    expected_ids, expected_scores = greedy(model, ids)
    pack_model(model)  # the long prefill gets a graph of its own
    assert_compiled_decode_matches(
        model, ids, expected_ids, expected_scores, fresh_dynamo, graphs=None
    )


def test_compiled_decode_takes_the_sparse_input_kernel_without_an_eager_decode_first(
    calibration_ids, fresh_dynamo
):
    """A TEAL model (sparse-input linears, no sparse MLP) compiled straight after quantizing:
    compile_decode builds the kernels' operands itself, so the graph multiplies only the
    active columns (it took the dense products unless an eager decode had built them)."""
    import copy

    model = build_tiny_model("llama", **WIDE)
    quantize(model, "teal-50", calibration_ids, progress=False)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(9))
    expected_ids, expected_scores = greedy(copy.deepcopy(model), ids)  # eager, on a copy
    ran = assert_compiled_decode_matches(model, ids, expected_ids, expected_scores, fresh_dynamo)
    if kernels.kernel_available():
        assert "channelwise_cpu::sparse_input_mm" in ran, sorted(ran)


def test_a_compiled_sparse_step_names_nan_activations(calibration_ids, fresh_dynamo):
    """In the graph the thresholds are fused torch ops and the sparse kernels' active-channel
    scan refuses NaN/inf; ``generate_text`` names that refusal as a NonFiniteError. A token
    first read by a compiled step (generated, fed back, never in the eager prefill) is made
    NaN in the embedding."""
    import copy

    from conftest import build_tiny_tokenizer

    from channelwise.deploy import generate_text

    if not kernels.kernel_available():
        pytest.skip("the compiled graph scans for NaN in the extension's sparse kernels")
    model = build_tiny_model("llama", **WIDE)
    quantize(model, "teal-50", calibration_ids, progress=False)
    tokenizer = build_tiny_tokenizer()
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    expected, _ = greedy(copy.deepcopy(model), ids, steps=6)
    fed_back = expected[0, ids.shape[1] : -1].tolist()  # the last token is never read
    new = [t for t in fed_back if t not in ids[0].tolist()]
    assert new, "the continuation must hold a token the prompt lacks"
    with torch.no_grad():
        model.get_input_embeddings().weight[new[0]] = float("nan")
    with pytest.raises(NonFiniteError, match="compiled decode step"):
        generate_text(model, tokenizer, PROMPT, max_new_tokens=6, chat=False, compiled=True)


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


# --- generate_text / `channelwise generate` ----------------------------------------------------


@pytest.fixture
def packed_folder(calibration_ids, tmp_path):
    from conftest import build_tiny_tokenizer

    from channelwise.compress import save_quantized

    model = build_tiny_model("llama", **WIDE)
    quantize(model, "rtn-w4a16-g64", calibration_ids, progress=False)
    pack_model(model)
    return save_quantized(model, build_tiny_tokenizer(), tmp_path / "w4")


PROMPT = "t5 t9 t17 t3"


def test_generate_text_is_the_models_greedy_continuation(packed_folder, fresh_dynamo):
    from channelwise import load_model
    from channelwise.deploy import generate_text

    model, tokenizer = load_model(packed_folder, device="cpu")
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    expected, _ = greedy(model, ids, steps=7)
    eager = generate_text(model, tokenizer, PROMPT, max_new_tokens=7, chat=False)
    assert eager.prompt_tokens == ids.shape[1]
    assert eager.new_tokens == 7 and eager.seconds > 0 and eager.compile_seconds is None
    assert eager.text == tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)
    compiled = generate_text(model, tokenizer, PROMPT, max_new_tokens=7, chat=False, compiled=True)
    assert compiled.text == eager.text
    assert compiled.compile_seconds is not None and compiled.compile_seconds > 0
    assert model.generation_config.cache_implementation == "static"


def test_generate_text_refuses_nan_logits_instead_of_printing_nothing():
    """Greedy decoding picks token 0 from NaN logits: a broken checkpoint printed an empty
    continuation and a tok/s figure, exit 0."""
    from conftest import build_tiny_tokenizer

    from channelwise.deploy import generate_text

    model = build_tiny_model("llama")
    tokenizer = build_tiny_tokenizer()
    assert generate_text(model, tokenizer, PROMPT, max_new_tokens=3, chat=False).new_tokens == 3
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(NonFiniteError, match="logits hold NaN or inf"):
        generate_text(model, tokenizer, PROMPT, max_new_tokens=3, chat=False)


def test_generate_text_decodes_through_a_compressed_kv_cache(calibration_ids, fresh_dynamo):
    from conftest import build_tiny_tokenizer

    from channelwise.deploy import generate_text
    from channelwise.kvcache import cache as kv_cache

    model = build_tiny_model("llama")
    quantize(model, "kivi-kv4", calibration_ids, progress=False)
    made = []
    original = kv_cache.make_cache
    kv_cache.make_cache = lambda m, config=None: made.append(original(m, config)) or made[-1]
    try:
        result = generate_text(model, build_tiny_tokenizer(), PROMPT, max_new_tokens=40, chat=False)
    finally:
        kv_cache.make_cache = original
    assert result.new_tokens == 40
    assert made and made[-1].layers[0].stored_tokens() == 4 + 40 - 1  # the last token is not fed
    with pytest.raises(ChannelwiseError, match="compressed KV cache decodes eagerly"):
        generate_text(model, build_tiny_tokenizer(), PROMPT, compiled=True)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "  "], "the prompt must be non-empty text"),
        (["--prompt", "t1", "--max-new-tokens", "0"], "max_new_tokens must be at least 1"),
        (["--prompt", "t1 t2", "--max-new-tokens", "63"], "exceed the model's 64 positions"),
        (["--prompt", "t1", "--cpp-wrapper"], "cpp_wrapper applies to the compiled decode loop"),
    ],
)
def test_cli_generate_refuses_bad_input(packed_folder, capsys, args, message):
    from channelwise.cli import main

    assert main(["-q", "--device", "cpu", "generate", str(packed_folder), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_generating_past_learned_positions_is_refused_before_any_step(family):
    from conftest import build_tiny_tokenizer

    from channelwise.deploy import generate_text

    model = build_tiny_model(family)  # 64 learned positions: an IndexError inside torch before
    with pytest.raises(ChannelwiseError, match="exceed the model's 64 positions"):
        generate_text(model, build_tiny_tokenizer(), PROMPT, max_new_tokens=61, chat=False)
    assert generate_text(model, build_tiny_tokenizer(), PROMPT, max_new_tokens=3, chat=False)


def test_cli_generate_prints_the_text_and_the_rate(packed_folder, capsys):
    from channelwise import load_model
    from channelwise.cli import main
    from channelwise.deploy import generate_text

    args = ["-q", "--device", "cpu", "generate", str(packed_folder), "--prompt", PROMPT]
    assert main([*args, "--max-new-tokens", "6", "--no-chat"]) == 0
    out, err = capsys.readouterr()
    model, tokenizer = load_model(packed_folder, device="cpu")
    expected = generate_text(model, tokenizer, PROMPT, max_new_tokens=6, chat=False)
    assert out == expected.text + "\n"
    assert "6 new tokens after a 4-token prompt in " in err and "tok/s" in err


def test_cpp_wrapper_decode_matches_the_fake_quant_model(calibration_ids, fresh_dynamo):
    """Inductor's C++ wrapper calls the same kernels (the W4 product and the sparse MLP op):
    same tokens and scores as eager."""
    model = build_tiny_model("llama", **WIDE)
    quantize(model, "chess-50-w4a16-g64", calibration_ids, progress=False)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(9))
    expected_ids, expected_scores = greedy(model, ids)
    pack_model(model)
    ran = assert_compiled_decode_matches(
        model, ids, expected_ids, expected_scores, fresh_dynamo, cpp_wrapper=True
    )
    assert model.generation_config.compile_config.options["cpp_wrapper"] is True
    if kernels.kernel_available():
        assert "channelwise_cpu::sparse_mlp" in ran, sorted(ran)
