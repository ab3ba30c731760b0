"""Packed checkpoints: integer codes at their bit width, bit-identical to the fake-quant model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, build_tiny_tokenizer
from helpers import logits, relative_error

from channelwise import load_model, quantize
from channelwise.compress import save_quantized
from channelwise.deploy import PackedLinear, pack_model
from channelwise.deploy.packed import use_kernels
from channelwise.errors import CheckpointError, PackingError
from channelwise.methods.registry import quantizes_weights
from channelwise.recipe import Recipe, load_recipe, preset_names

WIDE = dict(hidden_size=128, intermediate_size=256)  # every preset's group sizes fit


def _static_attention(name: str) -> bool:
    attention = load_recipe(name).attention
    return attention is not None and any(
        a is not None and not a.dynamic
        for a in (attention.q, attention.k, attention.v, attention.probs)
    )


# Presets with static attention ranges are the ViT ones: test_ias_vit saves and reloads them.
WEIGHT_PRESETS = [
    p
    for p in preset_names()
    if any(quantizes_weights(s.method) for s in load_recipe(p).steps) and not _static_attention(p)
]


@pytest.fixture(autouse=True)
def reference_path():
    """Packed modules dequantize and run a float GEMM here (bit-identical to fake-quant); the
    integer kernels are tested against that path with a tolerance at the end of this file."""
    before = use_kernels(False)
    yield
    use_kernels(before)


def compressed(family: str, preset: str | Recipe, calibration_ids: torch.Tensor):
    model = build_tiny_model(family, **(WIDE if family == "llama" else {}))
    quantize(model, preset, calibration_ids, progress=False)
    return model


def packed_modules(model) -> list[PackedLinear]:
    return [m for m in model.modules() if isinstance(m, PackedLinear)]


@pytest.mark.parametrize("preset", WEIGHT_PRESETS)
def test_every_weight_preset_packs_to_identical_logits_and_reloads(
    preset, calibration_ids, token_ids, tmp_path
):
    model = compressed("llama", preset, calibration_ids)
    expected = logits(model, token_ids)
    names = pack_model(model)
    assert len(packed_modules(model)) == 2 * 7
    assert len(names) == 2 * 7 + (load_recipe(preset).embedding is not None)
    assert torch.equal(logits(model, token_ids), expected)
    loaded, _ = load_model(save_quantized(model, build_tiny_tokenizer(), tmp_path / "out"))
    assert len(packed_modules(loaded)) == 14
    assert torch.equal(logits(loaded, token_ids), expected)


@pytest.mark.parametrize("family", ["qwen2", "mistral", "opt", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("preset", ["gptq-w4a16-g64", "rtn-w8a8"])
def test_other_families_pack_and_reload_identically(
    family, preset, calibration_ids, token_ids, tmp_path
):
    model = compressed(family, preset, calibration_ids)
    expected = logits(model, token_ids)
    pack_model(model)
    loaded, _ = load_model(save_quantized(model, build_tiny_tokenizer(), tmp_path / "out"))
    assert packed_modules(loaded)
    assert torch.equal(logits(loaded, token_ids), expected)


def test_packed_codes_take_their_bit_width_on_disk(calibration_ids, tmp_path):
    model = compressed("llama", "rtn-w4a16-g64", calibration_ids)
    pack_model(model)
    for module in packed_modules(model):
        out, inp = module.out_features, module.in_features
        assert module.qweight.dtype == torch.uint8 and module.qweight.shape == (out, inp // 2)
        assert module.scale.shape == module.zero.shape == (out, inp // 64)
        assert module.zero.dtype == torch.uint8
    folder = save_quantized(model, build_tiny_tokenizer(), tmp_path / "out")
    marker = json.loads((folder / "channelwise.json").read_text())
    assert marker["format"] == "packed" and len(marker["packed_linears"]) == 14
    float_model = build_tiny_model("llama", **WIDE)
    float_folder = tmp_path / "float"
    float_model.save_pretrained(float_folder)
    assert (folder / "model.safetensors").stat().st_size < 0.6 * (
        float_folder / "model.safetensors"
    ).stat().st_size


def test_symmetric_codes_store_no_zero_point(calibration_ids):
    model = compressed("llama", "rtn-w8a8", calibration_ids)
    pack_model(model)
    module = packed_modules(model)[0]
    assert module.zero is None and "zero" not in module.state_dict()
    codes = module.codes()
    assert codes.min() >= -128 and codes.max() <= 127


def test_online_hadamards_and_input_quantizers_move_to_the_packed_modules(
    calibration_ids, token_ids
):
    model = compressed("llama", "quarot-w4a4", calibration_ids)
    down = model.model.layers[0].mlp.down_proj
    hooks = len(down._forward_pre_hooks)
    assert hooks >= 2  # the online Hadamard and the input quantizer
    pack_model(model)
    assert len(model.model.layers[0].mlp.down_proj._forward_pre_hooks) == hooks


def test_a_weight_changed_after_quantization_is_refused(calibration_ids):
    model = compressed("llama", "rtn-w4a16-g64", calibration_ids)
    model.model.layers[1].mlp.up_proj.weight.data[0, 0] += 1e-3
    with pytest.raises(PackingError, match=r"layers\.1\.mlp\.up_proj.*not on its recorded"):
        pack_model(model)
    assert not packed_modules(model)  # nothing was replaced


def test_act_order_with_dynamic_groups_is_refused_with_the_fix(calibration_ids):
    recipe = Recipe.from_dict(
        {
            "name": "gptq-dynamic",
            "weights": {"bits": 4, "symmetric": False, "granularity": "group", "group_size": 64},
            "steps": [{"method": "gptq", "args": {"act_order": True}}],
        }
    )
    model = compressed("llama", recipe, calibration_ids)
    with pytest.raises(PackingError, match="static_groups"):
        pack_model(model)


def test_uncompressed_model_cannot_be_packed():
    with pytest.raises(PackingError, match="not compressed"):
        pack_model(build_tiny_model("llama"))


def test_activation_only_recipe_packs_nothing(calibration_ids):
    recipe = Recipe.from_dict(
        {
            "name": "a8",
            "activations": {"bits": 8, "symmetric": True, "granularity": "token", "dynamic": True},
        }
    )
    model = compressed("llama", recipe, calibration_ids)
    assert pack_model(model) == [] and not packed_modules(model)


@pytest.fixture
def packed_folder(calibration_ids, tmp_path) -> Path:
    model = compressed("llama", "rtn-w4a16-g64", calibration_ids)
    pack_model(model)
    return save_quantized(model, build_tiny_tokenizer(), tmp_path / "out")


def drop_tensor(folder: Path, key: str) -> None:
    """Delete ``key`` from ``folder``'s model.safetensors."""
    from safetensors.torch import load_file, save_file

    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    del state[key]
    save_file(state, str(weights), metadata={"format": "pt"})


def edit_config(folder: Path, **changes) -> None:
    """Overwrite fields of ``folder``'s config.json."""
    config_file = folder / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **changes}))


def test_corrupt_checkpoint_is_refused(packed_folder):
    weights = packed_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(packed_folder)


def test_checkpoint_whose_layout_does_not_match_its_tensors_is_refused(packed_folder):
    marker_file = packed_folder / "channelwise.json"
    marker = json.loads(marker_file.read_text())
    entry = marker["packed_linears"]["model.layers.0.self_attn.q_proj"]
    entry["spec"]["bits"] = 8
    marker_file.write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match=r"q_proj\.qweight.*expects"):
        load_model(packed_folder)


def test_float_checkpoint_whose_config_does_not_fit_its_tensors_is_refused(tiny_folder):
    config = json.loads((tiny_folder / "config.json").read_text())
    edit_config(tiny_folder, intermediate_size=config["intermediate_size"] * 2)
    with pytest.raises(CheckpointError, match="do not match the model its config describes"):
        load_model(tiny_folder, device="cpu")


def test_float_checkpoint_missing_a_tensor_is_refused_not_randomly_filled(tiny_folder):
    drop_tensor(tiny_folder, "model.layers.0.mlp.up_proj.weight")
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\).*up_proj.weight.*random"):
        load_model(tiny_folder, device="cpu")


def test_packed_folder_without_its_marker_is_refused(packed_folder):
    (packed_folder / "channelwise.json").unlink()
    with pytest.raises(CheckpointError, match="packed folder without its channelwise.json"):
        load_model(packed_folder, device="cpu")


@pytest.mark.parametrize("damage", ["truncate", "config"])
def test_corrupt_float_checkpoint_is_a_checkpoint_error(tiny_folder, damage):
    if damage == "truncate":
        weights = tiny_folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    else:  # fails transformers' own config validation
        heads = json.loads((tiny_folder / "config.json").read_text())["num_attention_heads"]
        edit_config(tiny_folder, hidden_size=heads * 8 + 1)
    with pytest.raises(CheckpointError, match="could not load model"):
        load_model(tiny_folder, device="cpu")


def test_missing_tokenizer_is_named_in_one_line(tiny_folder):
    from channelwise.errors import ModelNotFoundError

    (tiny_folder / "tokenizer.json").unlink()
    with pytest.raises(ModelNotFoundError, match="could not load the tokenizer of") as info:
        load_model(tiny_folder, device="cpu")
    assert "\n" not in str(info.value)


def test_pickled_weights_are_refused_before_reading(tiny_folder):
    (tiny_folder / "model.safetensors").unlink()
    (tiny_folder / "pytorch_model.bin").write_bytes(b"not read")  # would be unpickled
    with pytest.raises(CheckpointError, match="pickled PyTorch weights"):
        load_model(tiny_folder, device="cpu")


@pytest.mark.parametrize(
    "marker, message",
    [
        ([1, 2], "expected a JSON object, got list"),
        ({"packed_linears": ["q_proj"]}, "'packed_linears' must map module names to objects"),
        ({"input_quantizers": "x"}, "'input_quantizers' must map module names to objects"),
    ],
)
def test_marker_of_the_wrong_shape_is_refused(packed_folder, marker, message):
    (packed_folder / "channelwise.json").write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match=message):
        load_model(packed_folder, device="cpu")


def test_unreadable_side_file_is_refused(packed_folder):
    from channelwise.compress import STEP_STATE_FILE

    (packed_folder / STEP_STATE_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_model(packed_folder, device="cpu")


def test_gguf_cut_inside_its_header_is_a_clear_error(tmp_path):
    import struct

    from channelwise.errors import ModelNotFoundError

    cut = tmp_path / "cut.gguf"
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 2) + struct.pack("<Q", 40) + b"general."
    cut.write_bytes(header)
    with pytest.raises(ModelNotFoundError, match="could not read GGUF file"):
        load_model(cut, device="cpu")


def test_checkpoint_with_a_missing_tensor_is_refused(packed_folder):
    drop_tensor(packed_folder, "model.layers.1.mlp.down_proj.scale")
    with pytest.raises(CheckpointError, match="missing.*down_proj.scale"):
        load_model(packed_folder)


def test_packed_folder_loads_without_building_the_float_model(packed_folder, monkeypatch):
    """A packed 7B model must load where its float32 weights (30 GB) do not fit: the model is
    built on meta and every tensor comes from the files."""
    import transformers

    built = []
    real = transformers.AutoModelForCausalLM.from_config

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        built.append(all(p.is_meta for p in model.parameters()))
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", spy)
    model, _ = load_model(packed_folder)
    assert built == [True]
    assert not any(t.is_meta for t in model.state_dict().values())


def test_packed_folder_missing_an_unpacked_tensor_is_refused(packed_folder):
    drop_tensor(packed_folder, "model.embed_tokens.weight")
    with pytest.raises(CheckpointError, match="missing.*embed_tokens"):
        load_model(packed_folder)


def test_dgq_stores_its_4bit_codes_and_widens_them_to_the_same_int8_rows(
    calibration_ids, token_ids, tmp_path
):
    from safetensors.torch import load_file

    from channelwise.deploy.dual_grained import PackedDualGrained
    from channelwise.quant.dual_grained import int8_weight, recorded_dual_grained

    model = compressed("llama", "dgq-w4a8", calibration_ids)
    formats = {n: recorded_dual_grained(m) for n, m in model.named_modules()}
    formats = {n: f for n, f in formats.items() if f is not None}
    assert len(formats) == 14
    expected = logits(model, token_ids)
    pack_model(model)
    modules = dict(model.named_modules())
    weights = 0
    for name, dgw in formats.items():
        module = modules[name]
        assert isinstance(module, PackedDualGrained)
        assert module.qweight.shape == (module.out_features, module.in_features // 2)
        assert torch.equal(module.codes(), int8_weight(dgw).to(torch.int16))
        weights += module.out_features * module.in_features
    folder = save_quantized(model, build_tiny_tokenizer(), tmp_path / "out")
    stored = load_file(str(folder / "model.safetensors"))
    linear_bytes = sum(
        t.numel() * t.element_size()
        for key, t in stored.items()
        if key.rpartition(".")[0] in formats and not key.endswith(".bias")
    )
    assert linear_bytes < 0.6 * weights  # int8 rows would take >= 1 byte a weight
    loaded, _ = load_model(folder)
    assert sum(isinstance(m, PackedDualGrained) for m in loaded.modules()) == 14
    assert torch.equal(logits(loaded, token_ids), expected)
    marker_file = folder / "channelwise.json"
    marker = json.loads(marker_file.read_text())
    marker["packed_linears"]["model.layers.0.mlp.up_proj"]["group_size"] = 32
    marker_file.write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match=r"up_proj\.group_scale.*expects"):
        load_model(folder)
    marker["packed_linears"]["model.layers.0.mlp.up_proj"]["group_size"] = 7
    marker_file.write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match="up_proj.*does not fit.*group"):
        load_model(folder)


# --- opt-in embedding quantization --------------------------------------------------------------


def with_embedding(preset: str, embedding: dict) -> Recipe:
    data = load_recipe(preset).model_dump(mode="json", exclude_defaults=True)
    return Recipe.from_dict({**data, "name": f"{preset}+emb", "embedding": embedding})


@pytest.mark.parametrize(
    "embedding",
    [
        {"bits": 8, "granularity": "channel"},
        {"bits": 4, "symmetric": False, "granularity": "group", "group_size": 32},
    ],
)
def test_quantized_embedding_packs_once_with_its_tied_head(
    embedding, calibration_ids, token_ids, tmp_path
):
    model = compressed("llama", with_embedding("rtn-w4a16-g64", embedding), calibration_ids)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    expected = logits(model, token_ids)
    names = pack_model(model)
    assert {"model.embed_tokens", "lm_head"} <= set(names)
    assert torch.equal(logits(model, token_ids), expected)
    folder = save_quantized(model, build_tiny_tokenizer(), tmp_path / "out")
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.qweight" in keys and not any(k.startswith("lm_head") for k in keys)
    loaded, _ = load_model(folder)
    assert torch.equal(logits(loaded, token_ids), expected)


def test_embedding_quantization_changes_only_the_embedding(calibration_ids):
    plain = compressed("llama", "rtn-w4a16-g64", calibration_ids)
    emb = compressed(
        "llama",
        with_embedding("rtn-w4a16-g64", {"bits": 8, "granularity": "channel"}),
        calibration_ids,
    )
    before, after = plain.model.embed_tokens.weight, emb.model.embed_tokens.weight
    assert not torch.equal(before, after)
    assert all(row.unique().numel() <= 256 for row in after)  # each row on its own 8-bit grid
    assert torch.equal(
        plain.model.layers[0].mlp.up_proj.weight, emb.model.layers[0].mlp.up_proj.weight
    )


def test_embedding_granularity_that_a_lookup_cannot_use_is_refused():
    from channelwise.errors import RecipeError

    with pytest.raises(RecipeError, match="embedding: use granularity"):
        with_embedding("rtn-w4a16-g64", {"bits": 8, "granularity": "tensor"})


def test_embedding_group_that_does_not_fit_fails_before_any_work(calibration_ids):
    from channelwise.errors import RecipeError

    recipe = with_embedding("rtn-w4a16-g64", {"bits": 4, "granularity": "group", "group_size": 48})
    model = build_tiny_model("llama", **WIDE)
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    with pytest.raises(RecipeError, match="embedding does not fit"):
        quantize(model, recipe, calibration_ids, progress=False)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before)


def test_float16_storage_of_unquantized_tensors_reloads_what_was_rounded(
    calibration_ids, token_ids, tmp_path
):
    from channelwise.deploy.packed import round_float_tensors_

    model = compressed("llama", "rtn-w4a16-g64", calibration_ids)
    pack_model(model)
    full = save_quantized(model, build_tiny_tokenizer(), tmp_path / "fp32")
    before = logits(model, token_ids)
    assert round_float_tensors_(model, torch.float16) > 0
    after = logits(model, token_ids)
    assert not torch.equal(after, before)  # the embedding really was rounded
    assert (after - before).abs().max() < 1e-2 * before.abs().max()
    half = save_quantized(model, build_tiny_tokenizer(), tmp_path / "fp16")
    assert (half / "model.safetensors").stat().st_size < (full / "model.safetensors").stat().st_size
    loaded, _ = load_model(half)
    assert loaded.model.embed_tokens.weight.dtype == torch.float16  # kept as stored
    assert loaded.dtype == torch.float32  # the activations' dtype, for transformers
    assert torch.equal(logits(loaded, token_ids), after)
    scales = [m.scale for m in packed_modules(loaded)]
    assert all(s.dtype == torch.float32 for s in scales)


@pytest.mark.parametrize(("dtype", "tied"), [(torch.float16, True), (torch.bfloat16, False)])
def test_16_bit_float_embedding_and_head_stay_16_bit_after_loading(
    dtype, tied, calibration_ids, token_ids, tmp_path
):
    from channelwise.deploy.half import HalfEmbedding, HalfLinear
    from channelwise.deploy.packed import round_float_tensors_

    model = build_tiny_model("llama", tie_word_embeddings=tied, **WIDE)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    quantize(model, "rtn-w4a16-g64", calibration_ids, progress=False)
    pack_model(model)
    round_float_tensors_(model, dtype)
    expected = logits(model, token_ids)
    loaded, _ = load_model(save_quantized(model, build_tiny_tokenizer(), tmp_path / "out"))
    embedding, head = loaded.model.embed_tokens, loaded.lm_head
    assert isinstance(embedding, HalfEmbedding) and isinstance(head, HalfLinear)
    assert embedding.weight.dtype == head.weight.dtype == dtype
    assert (head.weight.data_ptr() == embedding.weight.data_ptr()) == tied  # tied: one copy
    assert torch.equal(embedding.weight.float(), model.model.embed_tokens.weight)
    assert torch.equal(head.weight.float(), model.lm_head.weight)
    assert torch.equal(logits(loaded, token_ids), expected)  # reference path: the same sums
    use_kernels(True)
    with torch.no_grad():  # decode-sized calls take the 16-bit kernel: float32 rounding apart
        step = loaded(token_ids[:, :4]).logits
    assert relative_error(step, expected[:, :4]) < 1e-5
    use_kernels(False)
    resaved = save_quantized(loaded, build_tiny_tokenizer(), tmp_path / "again")
    assert torch.equal(logits(load_model(resaved)[0], token_ids), expected)


def test_float16_storage_refuses_a_value_it_cannot_hold(calibration_ids):
    from channelwise.deploy.packed import round_float_tensors_

    model = compressed("llama", "rtn-w4a16-g64", calibration_ids)
    pack_model(model)
    model.model.norm.weight.data[3] = 1e5  # above float16's 65504
    embedding = model.model.embed_tokens.weight.clone()
    with pytest.raises(PackingError, match=r"model\.norm\.weight: 1e\+05 does not fit"):
        round_float_tensors_(model, torch.float16)
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # nothing rounded
    assert round_float_tensors_(model, torch.bfloat16) > 0


def test_float32_checkpoint_keeps_a_float32_embedding(calibration_ids, tmp_path):
    model = compressed("llama", "rtn-w4a16-g64", calibration_ids)
    pack_model(model)
    loaded, _ = load_model(save_quantized(model, build_tiny_tokenizer(), tmp_path / "out"))
    assert type(loaded.model.embed_tokens) is torch.nn.Embedding
    assert type(loaded.lm_head) is torch.nn.Linear


# --- command line -------------------------------------------------------------------------------


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    folder = tmp_path / "tiny"
    build_tiny_model("llama", **WIDE).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("fmt", "marker"), [("packed", "packed"), ("fake", "fake-quant"), ("compressed-tensors", None)]
)
def test_cli_quantize_writes_each_format(tiny_folder, tmp_path, capsys, fmt, marker):
    from channelwise.cli import main

    out = tmp_path / fmt
    args = ["-q", "--device", "cpu", "quantize", str(tiny_folder), "--recipe", "rtn-w4a16-g64"]
    umask = os.umask(0o027)
    try:
        assert main([*args, "--out", str(out), "--format", fmt]) == 0
    finally:
        os.umask(umask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.rglob("*") if f.is_file()}
    assert modes["model.safetensors"] == 0o640, modes  # safetensors alone leaves 0600
    assert set(modes.values()) == {0o640}, modes
    printed = capsys.readouterr().out
    files = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert f"; {files / 1e6:.1f} MB)" in printed  # what was written, measured
    if marker is None:
        config = json.loads((out / "config.json").read_text())
        assert config["quantization_config"]["format"] == "pack-quantized"
        assert "differ by at most 0" in printed
    else:
        assert json.loads((out / "channelwise.json").read_text())["format"] == marker


def test_cli_float16_storage_needs_a_packed_format(tiny_folder, tmp_path, capsys):
    from channelwise.cli import main

    args = ["-q", "quantize", str(tiny_folder), "--recipe", "rtn-w4a16-g64", "--format", "fake"]
    assert main([*args, "--out", str(tmp_path / "o"), "--float-dtype", "float16"]) == 2
    assert "--float-dtype needs --format packed" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- integer kernels ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "int_path"),
    [
        ("rtn-w8a8", True),
        ("outliertune-w8a8", True),  # static scale-1 integers (q/k/v, gate/up) + per token
        ("dgq-w4a8", True),  # static per-tensor int8 into int8 rows S2·(q − z)
        ("rtn-w8a16", False),
        ("rtn-w4a16-g64", False),
        ("gptq-w4a16-g64", False),
    ],
)
@pytest.mark.parametrize("tokens", [1, 16, 300])
def test_integer_kernels_match_the_fake_quant_model(
    preset, int_path, tokens, calibration_ids, monkeypatch
):
    from channelwise import kernels

    model = compressed("llama", preset, calibration_ids)
    ids = torch.randint(0, 128, (2, tokens), generator=torch.Generator().manual_seed(3))
    expected = logits(model, ids)
    quantization_error = relative_error(expected, logits(build_tiny_model("llama", **WIDE), ids))
    pack_model(model)
    use_kernels(True)
    calls = []
    for name in ("w8a8_linear", "w8a16_linear", "w4a16_linear"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(
            kernels, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw)
        )
    got = logits(model, ids)
    assert calls and all(c == calls[0] for c in calls)
    assert (calls[0] == "w8a8_linear") == int_path
    # Weight-only kernels sum in another fp32 order (~1e-7 per linear). W8A8 sums exactly in
    # int32 (each linear agrees to ~2e-7), but the next linear's per-token codes then sit on
    # rounding boundaries a little differently; the flips compound over the layers, so the two
    # W8A8 models differ by a fraction of their quantization error. A wrong scale or code
    # layout would differ by more than the whole quantization error.
    bound = 0.5 * quantization_error if int_path else 1e-5
    assert relative_error(got, expected) < bound


@pytest.mark.parametrize("fast", [False, True])
def test_w8a8_packs_for_onednn_only_where_onednn_is_fast(fast, calibration_ids, monkeypatch):
    # Some CPUs run oneDNN's int8 linear on a reference kernel thousands of times slower than
    # torch._int_mm (a 2-window SmolLM2 W8A8 eval took 40 min): the measured verdict decides.
    from channelwise.kernels import cpu

    monkeypatch.setattr(cpu, "_onednn_verdict", [fast])
    model = compressed("llama", "rtn-w8a8", calibration_ids)
    pack_model(model)
    use_kernels(True)
    ids = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(4))
    logits(model, ids)
    calls = [
        call
        for module in model.modules()
        if isinstance(module, PackedLinear)
        for call in module._kernel_calls.values()
    ]
    assert calls and all(c.kernel is not None for c in calls)
    packed = [c.keywords.get("w_packed") is not None for c in calls]
    assert (
        all(packed)
        if fast and cpu.prepack_int8(torch.ones(8, 8, dtype=torch.int8)) is not None
        else not any(packed)
    )


@pytest.mark.parametrize("preset", ["rtn-w8a16", "rtn-w4a16-g64", "rtn-w8a8"])
def test_kernel_operands_follow_buffer_changes(preset, calibration_ids):
    # A packed linear reuses its kernel operands between calls; writing its buffers in place,
    # replacing them (load_state_dict, .to) must be seen by the next call.
    model = compressed("llama", preset, calibration_ids)
    pack_model(model)
    use_kernels(True)
    linear = next(m for m in model.modules() if isinstance(m, PackedLinear))
    x = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(4))

    def reference() -> torch.Tensor:
        use_kernels(False)
        try:
            return linear(x)
        finally:
            use_kernels(True)

    before = linear(x)
    with torch.no_grad():
        linear.scale.mul_(2.0)
        if linear.zero is not None:  # the kernel reads zero points converted to float
            linear.zero.sub_(1)
    torch.testing.assert_close(linear(x), reference(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(linear(x), before)
    state = {k: v.clone() for k, v in linear.state_dict().items()}
    state["qweight"] = torch.flip(state["qweight"], dims=[0]).contiguous()
    linear.load_state_dict(state)
    torch.testing.assert_close(linear(x), reference(), rtol=1e-5, atol=1e-6)
    linear.qweight = linear.qweight.clone()  # a new tensor, same version number
    linear.qweight[0] = 0
    torch.testing.assert_close(linear(x), reference(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["rtn-w8a8", "rtn-w4a16-g64", "dgq-w4a8"])
def test_kernels_run_under_inference_mode(preset, calibration_ids, token_ids):
    # Inference-mode tensors have no version counter; the operand and input-code reuse must
    # not read one (it raised), whether the inputs or the packed buffers were made there.
    model = compressed("llama", preset, calibration_ids)
    pack_model(model)
    use_kernels(True)
    expected = logits(model, token_ids)
    with torch.inference_mode():
        torch.testing.assert_close(model(token_ids).logits, expected, rtol=0, atol=0)
        inference_built = compressed("llama", preset, calibration_ids)
        pack_model(inference_built)
        torch.testing.assert_close(inference_built(token_ids).logits, expected, rtol=0, atol=0)


def test_tied_head_of_an_8bit_embedding_runs_the_w8_kernel(calibration_ids, monkeypatch):
    from channelwise import kernels

    recipe = with_embedding("rtn-w4a16-g64", {"bits": 8, "granularity": "channel"})
    model = compressed("llama", recipe, calibration_ids)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    ids = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(4))
    expected = logits(model, ids)
    pack_model(model)
    use_kernels(True)
    shapes = []
    kernel = kernels.w8a16_linear
    monkeypatch.setattr(
        kernels, "w8a16_linear", lambda x, w, *a: shapes.append(tuple(w.shape)) or kernel(x, w, *a)
    )
    got = logits(model, ids)
    assert shapes == [(128, 128)]  # the vocabulary × hidden head, once
    assert relative_error(got, expected) < 1e-5
