"""GGUF export (llama.cpp), checked with the gguf package and transformers' own GGUF loader.

The gguf package de-quantizes every block exactly as llama.cpp's reference code does; its values
must equal our packed weights exactly (tolerance 0.0). transformers' loader, written
independently, undoes the Q/K row permutation and must rebuild a model with identical logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import VOCAB, build_tiny_model, build_tiny_tokenizer
from helpers import logits

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")

from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import GGUFReader  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from channelwise import load_model, quantize  # noqa: E402
from channelwise.deploy import pack_model  # noqa: E402
from channelwise.deploy.gguf import (  # noqa: E402
    export_gguf,
    gguf_blocks,
    gguf_path,
    qk_permutation,
    verify_gguf,
)
from channelwise.deploy.packed import use_kernels  # noqa: E402
from channelwise.errors import (  # noqa: E402
    CheckpointError,
    ExportError,
    OutputExistsError,
    OutputPathError,
    RecipeError,
)
from channelwise.quant import PerGroup, QuantSpec  # noqa: E402
from channelwise.recipe import Recipe, load_recipe  # noqa: E402

FORMATS = {  # (bits, symmetric) → GGUF type; all groups of 32 with float16 scales
    (4, True): T.Q4_0,
    (4, False): T.Q4_1,
    (5, True): T.Q5_0,
    (5, False): T.Q5_1,
    (8, True): T.Q8_0,
}


@pytest.fixture(autouse=True)
def reference_path():
    before = use_kernels(False)
    yield
    use_kernels(before)


def weights(bits: int, symmetric: bool, **changes) -> dict:
    spec = {"bits": bits, "symmetric": symmetric, "granularity": "group", "group_size": 32}
    spec.update(scale_dtype="float16", **({} if symmetric else {"zero_point": "float"}))
    return {**spec, **changes}


def recipe(weight_args: dict, steps=("rtn",), **fields) -> Recipe:
    data = {"name": "test-gguf", "weights": weight_args, "steps": [{"method": m} for m in steps]}
    return Recipe.from_dict({**data, **fields})


def packed_model(the_recipe, calibration_ids=None, family="llama", **overrides):
    model = build_tiny_model(family, **overrides)
    quantize(model, the_recipe, calibration_ids, progress=False)
    pack_model(model)
    return model


def export(model, tmp_path, **kwargs):
    return export_gguf(model, tmp_path / "model.gguf", build_tiny_tokenizer(), **kwargs)


# --- block bytes ----------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "symmetric"), list(FORMATS))
def test_blocks_dequantize_to_our_values_on_extreme_and_random_codes(bits, symmetric):
    zero_point = "integer" if symmetric else "float"
    spec = QuantSpec(bits, symmetric, PerGroup(32), scale_dtype="float16", zero_point=zero_point)
    g = torch.Generator().manual_seed(bits)
    rows, cols = 5, 96
    codes = torch.randint(spec.qmin, spec.qmax + 1, (rows, cols), generator=g)
    codes[0] = spec.qmin
    codes[1] = spec.qmax
    codes[2, ::2], codes[2, 1::2] = spec.qmin, spec.qmax  # alternating nibbles / fifth bits
    scale = (torch.rand(rows, cols // 32, generator=g) * 3).half().float()
    scale[0, 0] = 65504.0  # float16's largest value
    scale[1, 0] = 2.0**-24  # its smallest subnormal
    zero = None if symmetric else torch.randn(rows, cols // 32, generator=g).half().float()
    data = gguf_blocks(codes, scale, zero, spec)
    theirs = torch.from_numpy(dequantize(data, FORMATS[(bits, symmetric)]))
    s = scale.repeat_interleave(32, dim=1)
    ours = codes.float() * s if symmetric else codes.float() * s + zero.repeat_interleave(32, 1)
    assert torch.equal(theirs.reshape(rows, cols), ours)


def test_q4_0_nibble_order_is_ggufs():
    """Byte j of a block holds element j (low nibble) and element j + 16 (high nibble)."""
    spec = QuantSpec(4, True, PerGroup(32), scale_dtype="float16")
    codes = (torch.arange(32) % 16 - 8).reshape(1, 32)
    data = gguf_blocks(codes, torch.ones(1, 1), None, spec)[0]
    assert data[:2].view(np.float16)[0] == 1.0
    u = codes[0] + 8
    assert data[2:].tolist() == (u[:16] | (u[16:] << 4)).tolist()


def test_a_scale_that_is_not_a_float16_value_is_refused():
    spec = QuantSpec(8, True, PerGroup(32), scale_dtype="float16")
    with pytest.raises(ExportError, match="float16"):
        gguf_blocks(torch.zeros(1, 32, dtype=torch.int16), torch.full((1, 1), 0.1), None, spec)


def test_qk_permutation_is_undone_by_transformers_reverse_permute():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(12 * 8, 5)
    permuted = w[qk_permutation(96, 12)].numpy()
    restored = LlamaTensorProcessor()._reverse_permute_weights(permuted, 12, 12)
    assert torch.equal(torch.from_numpy(np.ascontiguousarray(restored)), w)


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "symmetric"), list(FORMATS))
@pytest.mark.parametrize("tied", [False, True])
def test_export_round_trips_exactly_per_format(bits, symmetric, tied, token_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    model = packed_model(recipe(weights(bits, symmetric)), tie_word_embeddings=tied)
    path = export(model, tmp_path)
    assert verify_gguf(path, model) == 0.0
    types = {t.name: t.tensor_type for t in GGUFReader(str(path)).tensors}
    assert types["blk.1.attn_k.weight"] == FORMATS[(bits, symmetric)]
    assert types["blk.0.attn_norm.weight"] == T.F32
    assert ("output.weight" in types) != tied
    reloaded = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).eval()
    assert torch.equal(logits(reloaded, token_ids), logits(model, token_ids))


@pytest.mark.parametrize(
    ("preset", "qtype"),
    [
        ("rtn-w4a16-q4_0", T.Q4_0),
        ("rtn-w4a16-q4_1", T.Q4_1),
        ("rtn-w8a16-q8_0", T.Q8_0),
        ("gptq-w4a16-q4_1", T.Q4_1),
        ("awq-w4a16-q4_1", T.Q4_1),
    ],
)
def test_presets_export_to_their_named_block_types(preset, qtype, calibration_ids, tmp_path):
    model = packed_model(load_recipe(preset), calibration_ids)
    path = export_gguf(model, tmp_path, build_tiny_tokenizer())
    assert path == tmp_path / f"{preset}.gguf"
    assert verify_gguf(path, model) == 0.0
    reader = GGUFReader(str(path))
    linears = [t for t in reader.tensors if t.name.startswith("blk.") and t.shape.size == 2]
    assert len(linears) == 14 and {t.tensor_type for t in linears} == {qtype}


def test_a_quantized_embedding_becomes_q8_0_and_f16_stores_an_unquantized_head(tmp_path):
    model = packed_model(recipe(weights(4, True), embedding=weights(8, True)))
    path = export(model, tmp_path, float_type="F16")
    assert verify_gguf(path, model) == 0.0
    types = {t.name: t.tensor_type for t in GGUFReader(str(path)).tensors}
    assert types["token_embd.weight"] == T.Q8_0
    assert types["output.weight"] == T.F16
    assert types["output_norm.weight"] == T.F32


def test_metadata_describes_the_model(tmp_path):
    model = packed_model(recipe(weights(4, True)))
    reader = GGUFReader(str(export(model, tmp_path)))
    value = {k: f.contents() for k, f in reader.fields.items()}
    config = model.config
    assert value["general.architecture"] == "llama"
    assert value["llama.block_count"] == config.num_hidden_layers
    assert value["llama.attention.head_count"] == config.num_attention_heads
    assert value["llama.attention.head_count_kv"] == config.num_key_value_heads
    assert value["llama.embedding_length"] == config.hidden_size
    assert value["llama.context_length"] == config.max_position_embeddings
    assert value["llama.rope.dimension_count"] == config.hidden_size // config.num_attention_heads
    assert value["llama.rope.freq_base"] == np.float32(config.rope_parameters["rope_theta"])
    assert value["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    assert value["tokenizer.ggml.tokens"] == [f"t{i}" for i in range(VOCAB)]
    assert Recipe.from_yaml(value["channelwise.recipe"]).name == "test-gguf"


def test_tokenizer_section_is_copied_from_the_source_gguf(tmp_path):
    source = tmp_path / "source.gguf"
    writer = gguf.GGUFWriter(str(source), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list([f"<{i}>" for i in range(VOCAB)])
    writer.add_token_merges(["< 1", "<1 >"])
    writer.add_bos_token_id(3)
    for step in ("header", "kv_data", "tensors"):
        getattr(writer, f"write_{step}_to_file")()
    writer.close()
    model = packed_model(recipe(weights(4, False)))
    path = export_gguf(model, tmp_path / "out.gguf", tokenizer_gguf=source)
    fields = GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert fields["tokenizer.ggml.tokens"].contents()[5] == "<5>"
    assert fields["tokenizer.ggml.merges"].contents() == ["< 1", "<1 >"]
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 3
    with pytest.raises(OutputExistsError, match="input"):
        export_gguf(model, source, tokenizer_gguf=source, force=True)


def test_verify_detects_a_model_the_file_does_not_hold(tmp_path):
    path = export(packed_model(recipe(weights(4, True))), tmp_path)
    other = packed_model(recipe(weights(4, True)), rope_theta=1234.0)
    with pytest.raises(ExportError, match="freq_base"):
        verify_gguf(path, other)
    other = packed_model(recipe(weights(4, True)))
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.scale.mul_(2)
    assert verify_gguf(path, other) > 0


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weight_args", "message"),
    [
        (weights(4, True, scale_dtype="float32"), "float32 scales"),
        (weights(4, True, group_size=64), "group_size: 32"),
        (weights(4, False, zero_point="integer"), "integer zero point"),
        (weights(3, True), "3-bit"),
        (weights(8, False), "8-bit asymmetric"),
        ({"bits": 8, "symmetric": True, "granularity": "channel"}, "groups? of 32"),
    ],
)
def test_grids_without_an_exact_block_format_are_refused(weight_args, message, tmp_path):
    model = packed_model(recipe(weight_args))
    with pytest.raises(ExportError, match=message):
        export(model, tmp_path)
    assert not any(tmp_path.iterdir())


def test_activation_quantization_is_refused(tmp_path):
    act = {"bits": 8, "symmetric": True, "granularity": "token", "dynamic": True}
    model = packed_model(recipe(weights(8, True), activations=act))
    with pytest.raises(ExportError, match="float activations"):
        export(model, tmp_path)


def test_online_hadamard_is_refused_as_inexpressible(calibration_ids, tmp_path):
    model = packed_model(recipe(weights(4, True), steps=("quarot", "rtn")), calibration_ids)
    with pytest.raises(ExportError, match="GGUF cannot express"):
        export(model, tmp_path)
    assert not any(tmp_path.iterdir())


def test_other_families_and_unpacked_models_are_refused(tmp_path):
    with pytest.raises(ExportError, match="the GGUF exporter writes gemma2, gemma3_text"):
        export(packed_model(recipe(weights(4, True)), family="opt"), tmp_path)
    model = build_tiny_model("llama")
    quantize(model, recipe(weights(4, True)), None, progress=False)
    with pytest.raises(ExportError, match="pack_model"):
        export(model, tmp_path)
    with pytest.raises(ExportError, match="not compressed"):
        export(build_tiny_model("llama"), tmp_path)


def test_a_fused_phi3_projection_whose_parts_differ_is_refused(tmp_path):
    model = packed_model(load_recipe("rtn-w4a16-q4_0"), family="phi3")
    split = model.model.layers[1].self_attn.qkv_proj
    split.k_proj = torch.nn.Linear(split.k_proj.in_features, split.k_proj.out_features, bias=False)
    with pytest.raises(ExportError, match="qkv_proj: its parts .* are quantized differently"):
        export(model, tmp_path)
    assert not any(tmp_path.iterdir())


# --- atomic writes ------------------------------------------------------------------------------


def test_existing_file_is_kept_unless_forced_and_a_failed_write_leaves_it(tmp_path, monkeypatch):
    model = packed_model(recipe(weights(4, True)))
    target = tmp_path / "model.gguf"
    target.write_bytes(b"GGUF old")
    with pytest.raises(OutputExistsError):
        export(model, tmp_path)

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OutputPathError, match="disk full"):
        export(model, tmp_path, force=True)
    assert target.read_bytes() == b"GGUF old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]
    monkeypatch.undo()
    assert verify_gguf(export(model, tmp_path, force=True), model) == 0.0


def test_a_recipe_name_cannot_lead_the_export_out_of_its_folder(tmp_path):
    with pytest.raises(ExportError, match="outside"):
        gguf_path(tmp_path / "out", "../../evil")
    assert gguf_path(tmp_path, "rtn-w4a16-q4_0") == (tmp_path / "rtn-w4a16-q4_0.gguf").resolve()
    with pytest.raises(RecipeError, match="recipe name"):
        Recipe.from_yaml("name: ../../evil\nweights: {bits: 4}\n")
    assert not (tmp_path.parent.parent / "evil.gguf").exists()


def test_cli_writes_a_verified_gguf(tmp_path, capsys):
    from channelwise.cli import main

    folder = tmp_path / "tiny"
    build_tiny_model("llama").save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    args = ["-q", "--device", "cpu", "quantize", str(folder), "--recipe", "rtn-w4a16-q4_1"]
    assert main([*args, "--format", "gguf", "--out", str(tmp_path / "out")]) == 0
    assert "differ by at most 0" in capsys.readouterr().out
    assert (tmp_path / "out" / "rtn-w4a16-q4_1.gguf").is_file()
    assert main([*args, "--format", "gguf", "--out", str(tmp_path / "out")]) == 2
    assert "exists" in capsys.readouterr().err


def test_a_tokenizer_that_does_not_fit_the_vocabulary_is_refused(tmp_path):
    model = packed_model(recipe(weights(4, True)), vocab_size=64)
    with pytest.raises(ExportError, match="token id 127"):
        export(model, tmp_path)
    with pytest.raises(ExportError, match="needs a tokenizer"):
        export_gguf(model, tmp_path / "x.gguf")
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_smollm2_q4_1_export_reproduces_its_source_gguf_byte_for_byte(tmp_path):
    """The embedded model was loaded from llama.cpp's own Q4_1 file (Q8_0 embedding): its
    weights lie on that grid, so re-quantizing them with our Q4_1/Q8_0 grids must give back every
    block of the file (codes, float16 scales and minimums, nibble order, Q/K row order)."""
    from channelwise import load_model
    from channelwise.models import embedded_gguf

    source = embedded_gguf()
    model, tokenizer = load_model(device="cpu")
    the_recipe = recipe(weights(4, False), embedding=weights(8, True))
    quantize(model, the_recipe, None, progress=False)
    pack_model(model)
    path = export_gguf(model, tmp_path / "smollm2.gguf", tokenizer, tokenizer_gguf=source)
    ours = {t.name: t for t in GGUFReader(str(path)).tensors}
    theirs = {t.name: t for t in GGUFReader(str(source)).tensors}
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert ours[name].tensor_type == tensor.tensor_type, name
        assert np.array_equal(np.asarray(ours[name].data), np.asarray(tensor.data)), name


# --- other architectures ----------------------------------------------------------------------

#: Config overrides that make a tiny model what transformers rebuilds from its GGUF (it reads no
#: query_pre_attn_scalar, layer pattern or Qwen3 head_dim: their defaults).
GGUF_FAMILIES = {
    "mistral": {},
    "qwen2": {},
    "qwen3": dict(head_dim=128),
    "gemma2": dict(query_pre_attn_scalar=256),
    "gemma3_text": dict(query_pre_attn_scalar=256, layer_types=None),
    "phi3": {},  # fused qkv_proj / gate_up_proj, quantized as parts, written fused
}


@pytest.mark.parametrize("family", list(GGUF_FAMILIES))
def test_other_architectures_export_and_reload(
    family, calibration_ids, token_ids, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("CHANNELWISE_HOME", str(tmp_path / "home"))  # the GGUF → float cache
    model = packed_model(load_recipe("rtn-w4a16-q4_0"), family=family, **GGUF_FAMILIES[family])
    for module in model.modules():  # Gemma's norms start at w = 0: make 1 + w matter
        if type(module).__name__.endswith("RMSNorm"):
            module.weight.data.uniform_(-0.5, 0.5)
    path = export(model, tmp_path)
    assert verify_gguf(path, model) == 0.0
    reader = GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == {
        "mistral": "llama",
        "gemma3_text": "gemma3",
    }.get(family, family)
    if family == "phi3":
        names = {t.name for t in reader.tensors}
        assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= names
    reloaded = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).eval()
    assert reloaded.config.model_type == {"mistral": "llama"}.get(family, family)
    torch.testing.assert_close(
        logits(reloaded, token_ids), logits(model, token_ids), atol=1e-5, rtol=0
    )
    loaded, _ = load_model(path)  # converted one tensor at a time: what transformers builds
    assert len(list((tmp_path / "home" / "models").glob("*/model-*.safetensors"))) == 3
    assert loaded.state_dict().keys() == reloaded.state_dict().keys()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    quantize(loaded, "rtn-w8a8", calibration_ids, progress=False)  # then a recipe on top
    assert torch.isfinite(logits(loaded, token_ids)).all()


def test_a_gguf_that_transformers_rebuilds_wrongly_is_a_checkpoint_error(tmp_path, monkeypatch):
    """transformers reads no Qwen3 head_dim from a GGUF (it assumes 128): a one-line error."""
    monkeypatch.setenv("CHANNELWISE_HOME", str(tmp_path / "home"))
    model = packed_model(load_recipe("rtn-w4a16-q4_0"), family="qwen3")  # head_dim 16
    path = export(model, tmp_path)
    with pytest.raises(CheckpointError, match="do not fit the model transformers builds"):
        load_model(path)


def test_a_gguf_missing_a_block_tensor_is_refused_not_randomly_filled(tmp_path, monkeypatch):
    import gguf

    monkeypatch.setenv("CHANNELWISE_HOME", str(tmp_path / "home"))
    path = export(packed_model(load_recipe("rtn-w4a16-q4_0")), tmp_path)

    class WithoutOne(GGUFReader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.tensors = [t for t in self.tensors if t.name != "blk.1.ffn_up.weight"]

    monkeypatch.setattr(gguf, "GGUFReader", WithoutOne)
    missing = r"not in the file \(first: .*layers\.1\.mlp\.up_proj"
    with pytest.raises(CheckpointError, match=missing):
        load_model(path)
    assert not any((tmp_path / "home" / "models").iterdir())  # nothing half-converted is cached


def test_a_gguf_loads_offloaded_from_its_converted_shards(tmp_path, monkeypatch, token_ids):
    from channelwise.offload import load_offloaded, offloaded

    monkeypatch.setenv("CHANNELWISE_HOME", str(tmp_path / "home"))
    path = export(packed_model(load_recipe("rtn-w4a16-q4_0"), family="qwen2"), tmp_path)
    loaded, _ = load_model(path)
    model, _ = load_offloaded(path)  # a GGUF larger than memory: converted, then read by block
    assert not any(offloaded(model).materialised(i) for i in range(2))
    torch.testing.assert_close(logits(model, token_ids), logits(loaded, token_ids), rtol=0, atol=0)
