"""Models larger than RAM: block weights left on disk (channelwise.offload)."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, build_tiny_tokenizer
from safetensors import safe_open

from channelwise import load_model, quantize, save_quantized
from channelwise.cli import main
from channelwise.deploy import pack_model
from channelwise.deploy.packed import round_float_tensors_
from channelwise.errors import CheckpointError, PackingError
from channelwise.offload import OffloadError, _overlay_prefix, load_offloaded, offloaded

#: GPT-NeoX's checkpoint names its head ``embed_out`` and Mixtral's its experts
#: ``block_sparse_moe.experts.N.w1``: read through the adapters' ``checkpoint_renames``.
OFFLOADABLE = (
    "llama",
    "qwen2",
    "qwen3",
    "gemma3_text",
    "opt",
    "gpt2",
    "phi3",
    "mixtral",
    "gpt_neox",
)


def save_tiny(folder: Path, family: str = "llama", shards: bool = True) -> Path:
    layers = {} if family.startswith("gemma") else {"num_hidden_layers": 3}
    model = build_tiny_model(family, **layers)
    model.save_pretrained(folder, max_shard_size="40KB" if shards else "1GB")
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def digest(folder: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.iterdir())
    }


def quantize_both(folder: Path, recipe: str, calibration_ids, memory_out: Path):
    """``recipe`` applied to the model whole in memory (saved to ``memory_out``) and offloaded;
    ``(in-memory model, offloaded model, tokenizer)``."""
    loaded, tokenizer = load_model(folder)
    quantize(loaded, recipe, calibration_ids, progress=False)
    save_quantized(loaded, tokenizer, memory_out)
    model, tokenizer = load_offloaded(folder)
    quantize(model, recipe, calibration_ids, progress=False)
    assert materialised_blocks(model) == 0
    return loaded, model, tokenizer


def materialised_blocks(model) -> int:
    weights = offloaded(model)
    return sum(weights.materialised(i) for i in range(len(weights.blocks)))


@pytest.mark.parametrize("family", OFFLOADABLE)
def test_offloaded_model_computes_what_the_loaded_model_does(tmp_path, family, token_ids):
    folder = save_tiny(tmp_path / "src", family)
    assert len(list(folder.glob("model-*.safetensors"))) > 1  # a sharded checkpoint
    loaded, _ = load_model(folder)
    model, _ = load_offloaded(folder)
    assert materialised_blocks(model) == 0
    most = []
    for block in offloaded(model).blocks:
        block.register_forward_pre_hook(lambda *_: most.append(materialised_blocks(model)))
    with torch.no_grad():
        expected = loaded(token_ids).logits
        got = model(token_ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert max(most) == 1  # one block at a time
    assert materialised_blocks(model) == 0


@pytest.mark.parametrize(
    "recipe", ["rtn-w4a16-g64", "rtn-w8a8", "gptq-w4a16-g64", "smoothquant-w8a8", "awq-w4a16-g64"]
)
def test_quantizing_offloaded_saves_what_quantizing_in_memory_saves(
    tmp_path, recipe, calibration_ids, token_ids
):
    folder = save_tiny(tmp_path / "src")
    before = digest(folder)
    loaded, model, tokenizer = quantize_both(folder, recipe, calibration_ids, tmp_path / "memory")
    with torch.no_grad():
        offloaded_logits = model(token_ids).logits
        memory_logits = loaded(token_ids).logits
    torch.testing.assert_close(offloaded_logits, memory_logits, rtol=0, atol=1e-5)
    save_quantized(model, tokenizer, tmp_path / "disk")
    assert len(list((tmp_path / "disk").glob("model-*.safetensors"))) == 4  # resident + 3 blocks
    assert digest(folder) == before  # the input is never written
    from_memory, _ = load_model(tmp_path / "memory")
    from_disk, _ = load_model(tmp_path / "disk")
    memory_state, disk_state = from_memory.state_dict(), from_disk.state_dict()
    assert memory_state.keys() == disk_state.keys()
    for key, value in memory_state.items():
        torch.testing.assert_close(disk_state[key], value, rtol=0, atol=1e-6, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(from_disk(token_ids).logits, memory_logits, rtol=0, atol=1e-5)
    shards = sorted((tmp_path / "disk").glob("model-*.safetensors"))
    assert all(shard.stat().st_nlink == 2 for shard in shards[1:])  # the written-back blocks
    overlay = offloaded(model).overlay
    del model
    gc.collect()
    assert not overlay.exists()  # the private copies go with the model, the saved folder stays
    again, _ = load_model(tmp_path / "disk")
    with torch.no_grad():
        torch.testing.assert_close(again(token_ids).logits, memory_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("family", "recipe"),
    [("phi3", "awq-w4a16-g64"), ("mixtral", "rtn-w8a8"), ("gpt_neox", "rtn-w4a16-g64")],
)
def test_split_and_renamed_families_offload_and_save_what_transformers_loads(
    tmp_path, family, recipe, calibration_ids, token_ids
):
    """Phi-3's fused projections and Mixtral's fused experts are split on meta, read fused from
    the checkpoint (Mixtral's under their legacy per-expert names), and saved fused again (float
    weights on the grid, transformers' own names): what transformers loads."""
    folder = save_tiny(tmp_path / "src", family)
    _, model, tokenizer = quantize_both(folder, recipe, calibration_ids, tmp_path / "memory")
    save_quantized(model, tokenizer, tmp_path / "disk")

    def keys(folder: Path) -> set[str]:
        names = set()
        for shard in folder.glob("*.safetensors"):
            with safe_open(str(shard), "pt") as handle:
                names |= set(handle.keys())
        return names

    fused = {
        "phi3": "self_attn.qkv_proj.weight",
        "mixtral": "mlp.experts.gate_up_proj",
        "gpt_neox": "lm_head.weight",  # the model's name; its checkpoint said embed_out
    }[family]
    assert any(key.endswith(fused) for key in keys(tmp_path / "disk"))
    assert not any(
        ".q_proj." in k or ".experts.0." in k
        for k in keys(tmp_path / "disk")
        if "qkv" in k or "experts" in k
    )
    from_memory, _ = load_model(tmp_path / "memory")
    from_disk, _ = load_model(tmp_path / "disk")
    with torch.no_grad():
        torch.testing.assert_close(
            from_disk(token_ids).logits, from_memory(token_ids).logits, rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("recipe", ["kivi-kv4", "kv_bfp", "gptq-w4a16-g64+kivi"])
def test_kv_caches_run_offloaded_as_in_memory_and_save_and_load_back(
    tmp_path, recipe, calibration_ids
):
    from channelwise.evaluate import perplexity
    from channelwise.kvcache import chunked_perplexity
    from channelwise.recipe import Recipe, load_recipe

    if recipe == "kv_bfp":  # K-sort reads every block's k_proj: from disk when offloaded
        recipe = Recipe.from_dict({"name": "kv-bfp-8", "kv_cache": {
            "method": "kv_bfp", "args": {"block": 8}}})  # fmt: skip
    if recipe == "gptq-w4a16-g64+kivi":  # a weight step with a KV cache
        kv = load_recipe("kivi-kv4").kv_cache.model_dump(mode="json")
        data = load_recipe("gptq-w4a16-g64").model_dump(mode="json")
        recipe = Recipe.from_dict(dict(data, name="gptq-kivi", kv_cache=kv))
    folder = save_tiny(tmp_path / "src")
    loaded, model, tokenizer = quantize_both(folder, recipe, calibration_ids, tmp_path / "mem")
    windows = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(5))
    expected = chunked_perplexity(loaded, windows, chunk=4, progress=False)
    got = chunked_perplexity(model, windows, chunk=4, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)
    assert materialised_blocks(model) == 0
    saved = save_quantized(model, tokenizer, tmp_path / "offloaded")
    again, _ = load_offloaded(saved)
    assert chunked_perplexity(again, windows, chunk=4, progress=False) == pytest.approx(
        expected, rel=1e-5
    )
    plain = perplexity(load_model(folder)[0], windows, progress=False)
    assert plain != pytest.approx(expected, rel=1e-4), "the cache is in the loop"


def test_static_attention_ranges_calibrate_offloaded_as_in_memory(
    tmp_path, calibration_ids, token_ids
):
    """Static q/k/v ranges are calibrated block by block with the blocks on disk: the same
    quantizers as in memory, saved beside the offloaded model (fake-quant and packed) and
    restored when it loads, offloaded or whole."""
    from channelwise.recipe import Recipe, load_recipe

    static8 = {"bits": 8, "symmetric": False, "granularity": "tensor", "dynamic": False}
    data = load_recipe("rtn-w8a8").model_dump(mode="json")
    recipe = Recipe.from_dict(
        dict(data, name="w8a8-static-qkv", attention={"q": static8, "k": static8, "v": static8})
    )
    folder = save_tiny(tmp_path / "src")
    loaded, model, tokenizer = quantize_both(folder, recipe, calibration_ids, tmp_path / "mem")
    with torch.no_grad():
        expected = loaded(token_ids).logits
        torch.testing.assert_close(model(token_ids).logits, expected, rtol=0, atol=1e-6)
        fp = load_model(folder)[0](token_ids).logits
    assert not torch.allclose(fp, expected, atol=1e-4), "the attention quantizers are in the loop"
    fake = save_quantized(model, tokenizer, tmp_path / "fake")
    assert (fake / "attention_ranges.safetensors").is_file()
    for again in (load_offloaded(fake)[0], load_model(fake)[0]):
        with torch.no_grad():
            torch.testing.assert_close(again(token_ids).logits, expected, rtol=0, atol=1e-6)
    pack_model(model)
    packed, _ = load_model(save_quantized(model, tokenizer, tmp_path / "packed"))
    with torch.no_grad():
        torch.testing.assert_close(packed(token_ids).logits, expected, rtol=0, atol=1e-6)


def test_a_single_file_checkpoint_offloads_too(tmp_path, token_ids):
    folder = save_tiny(tmp_path / "src", shards=False)
    assert (folder / "model.safetensors").is_file()
    loaded, _ = load_model(folder)
    model, _ = load_offloaded(folder)
    with torch.no_grad():
        torch.testing.assert_close(model(token_ids).logits, loaded(token_ids).logits)


def test_whole_model_steps_and_renamed_checkpoints_are_refused(tmp_path, calibration_ids):
    folder = save_tiny(tmp_path / "src")
    model, _ = load_offloaded(folder)
    with pytest.raises(OffloadError, match="step 'quarot' changes the whole model at once"):
        quantize(model, "quarot-rtn-w8a8", calibration_ids, progress=False)
    with pytest.raises(OffloadError, match=r"'rotatekv' changes .* run offloaded: kivi, kv_bfp"):
        quantize(model, "rotatekv-kv4", calibration_ids, progress=False)
    from safetensors.torch import load_file, save_file

    odd = save_tiny(tmp_path / "odd", shards=False)
    state = load_file(odd / "model.safetensors")
    state["model.layers.0.mlp.w_up.weight"] = state.pop("model.layers.0.mlp.up_proj.weight")
    save_file(state, str(odd / "model.safetensors"))
    with pytest.raises(OffloadError, match=r"named differently .*layers\.0\.mlp\.w_up"):
        load_offloaded(odd)


def test_broken_checkpoints_are_clear_errors(tmp_path):
    folder = save_tiny(tmp_path / "src")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.rename(tmp_path / "away.safetensors")
    with pytest.raises(CheckpointError, match="is missing"):
        load_offloaded(folder)
    (tmp_path / "away.safetensors").rename(shard)
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a safetensors index"):
        load_offloaded(folder)


def test_a_truncated_or_mislisted_safetensors_file_is_refused_when_opened(tmp_path, capsys):
    single = save_tiny(tmp_path / "single", shards=False)
    os.truncate(single / "model.safetensors", 1000)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*truncated or not a safet"):
        load_offloaded(single)
    args = ["--offload", "--windows", "2", "--seqlen", "32"]
    assert main(["-q", "eval", str(single), *args]) == 2
    assert "truncated or not a safetensors file" in capsys.readouterr().err
    sharded = save_tiny(tmp_path / "sharded")
    last = sorted(sharded.glob("model-*.safetensors"))[-1]
    os.truncate(last, 1000)  # a block's shard: refused at load, not when the block runs
    with pytest.raises(CheckpointError, match=f"{last.name}: .*truncated"):
        load_offloaded(sharded)
    listed = save_tiny(tmp_path / "listed")
    index = listed / "model.safetensors.index.json"
    spec = json.loads(index.read_text())
    key = "model.layers.2.mlp.up_proj.weight"
    others = sorted(set(spec["weight_map"].values()) - {spec["weight_map"][key]})
    spec["weight_map"][key] = others[0]
    index.write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match=f"puts tensor {key} in {others[0]}, which does not"):
        load_offloaded(listed)


def test_an_integer_tensor_where_the_model_holds_floats_is_refused(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = save_tiny(tmp_path / "src", shards=False)
    state = load_file(folder / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    state[key] = state[key].to(torch.int8)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor {key} is stored as int8, where"):
        load_offloaded(folder)
    args = ["--offload", "--windows", "2", "--seqlen", "32"]
    assert main(["-q", "eval", str(folder), *args]) == 2
    assert f"{key} is stored as int8" in capsys.readouterr().err
    # loaded whole, transformers cast the codes to a weight of zeros and evaluated it
    assert main(["-q", "eval", str(folder), *args[1:]]) == 2
    assert f"{key} is stored as int8" in capsys.readouterr().err


def test_a_missing_block_tensor_is_refused_when_the_block_is_read(tmp_path, token_ids):
    folder = tmp_path / "src"
    model = build_tiny_model("llama", num_hidden_layers=3)
    state = {k: v for k, v in model.state_dict().items() if "layers.2.mlp.up_proj" not in k}
    folder.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    model.config.save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    offloaded_model, _ = load_offloaded(folder)
    with pytest.raises(
        CheckpointError, match="layers.2.mlp.up_proj.weight is not in the checkpoint"
    ):
        offloaded_model(token_ids)


def test_a_saved_fake_quant_folder_loads_offloaded_and_a_packed_one_is_refused(
    tmp_path, calibration_ids, token_ids
):
    folder = save_tiny(tmp_path / "src")
    model, tokenizer = load_model(folder)
    quantize(model, "rtn-w8a8", calibration_ids, progress=False)
    save_quantized(model, tokenizer, tmp_path / "fake")
    loaded, _ = load_model(tmp_path / "fake")
    again, _ = load_offloaded(tmp_path / "fake")
    with torch.no_grad():  # the dynamic int8 input quantizers are back: equal logits
        torch.testing.assert_close(again(token_ids).logits, loaded(token_ids).logits)
        assert not torch.allclose(again(token_ids).logits, model_fp_logits(folder, token_ids))
    pack_model(model)
    save_quantized(model, tokenizer, tmp_path / "packed")
    with pytest.raises(OffloadError, match="packed integer codes"):
        load_offloaded(tmp_path / "packed")
    with pytest.raises(PackingError, match="without recording the grid"):
        pack_model(again)  # a reloaded fake-quant folder carries no grids to pack


@pytest.mark.parametrize(
    ("family", "recipe"),
    [
        ("llama", "rtn-w4a16-g64"),
        ("llama", "gptq-w4a16-g64"),
        ("llama", "rtn-w8a8"),
        ("llama", "rtn-w4a16-g64-e8"),
        ("gpt2", "rtn-w4a16-g64"),
        ("qwen2", "awq-w4a16-g64"),
        ("phi3", "gptq-w4a16-g64"),
        ("mixtral", "awq-w4a16-g64"),
        ("gpt_neox", "gptq-w4a16-g64"),
    ],
)
def test_an_offloaded_model_saves_packed_what_an_in_memory_one_saves_packed(
    tmp_path, family, recipe, calibration_ids, token_ids
):
    folder = save_tiny(tmp_path / "src", family)
    before = digest(folder)
    loaded, tokenizer = load_model(folder)
    quantize(loaded, recipe, calibration_ids, progress=False)
    expected = pack_model(loaded)
    save_quantized(loaded, tokenizer, tmp_path / "memory")
    model, tokenizer = load_offloaded(folder)
    quantize(model, recipe, calibration_ids, progress=False)
    assert pack_model(model) == expected
    assert materialised_blocks(model) == 0
    save_quantized(model, tokenizer, tmp_path / "disk")
    assert materialised_blocks(model) == 0 and digest(folder) == before
    marker = json.loads((tmp_path / "disk" / "channelwise.json").read_text())
    in_memory = json.loads((tmp_path / "memory" / "channelwise.json").read_text())
    assert marker["format"] == "packed" and marker == in_memory
    from_memory, _ = load_model(tmp_path / "memory")
    from_disk, _ = load_model(tmp_path / "disk")
    memory_state, disk_state = from_memory.state_dict(), from_disk.state_dict()
    assert memory_state.keys() == disk_state.keys()
    for key, value in memory_state.items():
        assert value.dtype == disk_state[key].dtype, key  # codes stay codes
        torch.testing.assert_close(disk_state[key], value, rtol=0, atol=1e-6, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(
            from_disk(token_ids).logits, from_memory(token_ids).logits, rtol=0, atol=1e-5
        )


def stored_dtypes(folder: Path) -> dict[str, torch.dtype]:
    dtypes = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            dtypes |= {key: f.get_slice(key).get_dtype() for key in f.keys()}
    return dtypes


@pytest.mark.parametrize(
    ("family", "recipe", "dtype"),
    [
        ("llama", "rtn-w4a16-g64", torch.float16),
        ("llama", "rtn-w4a16-g64-e8", torch.bfloat16),
        ("qwen2", "rtn-w8a8", torch.float16),  # q/k/v biases
        ("gpt2", "rtn-w4a16-g64", torch.float16),  # untied biases everywhere, transposed weights
    ],
)
def test_an_offloaded_model_saves_16_bit_floats_as_an_in_memory_one_does(
    tmp_path, family, recipe, dtype, token_ids
):
    folder = save_tiny(tmp_path / "src", family)
    loaded, tokenizer = load_model(folder)
    quantize(loaded, recipe, None, progress=False)
    pack_model(loaded)
    round_float_tensors_(loaded, dtype)
    save_quantized(loaded, tokenizer, tmp_path / "memory")
    model, tokenizer = load_offloaded(folder)
    quantize(model, recipe, None, progress=False)
    pack_model(model)
    round_float_tensors_(model, dtype)
    save_quantized(model, tokenizer, tmp_path / "disk")
    assert materialised_blocks(model) == 0
    in_memory, on_disk = stored_dtypes(tmp_path / "memory"), stored_dtypes(tmp_path / "disk")
    assert on_disk == in_memory
    assert {torch.float16: "F16", torch.bfloat16: "BF16"}[dtype] in set(on_disk.values())
    from_memory, _ = load_model(tmp_path / "memory")
    from_disk, _ = load_model(tmp_path / "disk")
    for key, value in from_memory.state_dict().items():
        assert torch.equal(from_disk.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(from_disk(token_ids).logits, from_memory(token_ids).logits)


def test_an_offloaded_block_value_too_large_for_16_bits_is_refused_when_saved(tmp_path):
    folder = save_tiny(tmp_path / "src")
    model, tokenizer = load_offloaded(folder)
    quantize(model, "rtn-w4a16-g64", None, progress=False)
    pack_model(model)
    round_float_tensors_(model, torch.float16)
    weights = offloaded(model)
    with weights.holding(1, keep_changes=True) as block:  # a value fp16 cannot hold, on disk
        block.input_layernorm.weight.data[3] = 1e6
    with pytest.raises(
        PackingError, match=r"layers\.1\.input_layernorm\.weight: 1e\+06 does not fit"
    ):
        save_quantized(model, tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_offloaded_model_without_grids_is_refused_before_saving(tmp_path, calibration_ids):
    from channelwise.recipe import load_recipe

    folder = save_tiny(tmp_path / "src")
    model, tokenizer = load_offloaded(folder)
    recipe = load_recipe("gptq-w4a16-g64")
    step = recipe.steps[0].model_copy(update={"args": {"act_order": True}})
    quantize(model, recipe.model_copy(update={"steps": (step,)}), calibration_ids, progress=False)
    with pytest.raises(PackingError, match="static_groups"):
        pack_model(model)
    assert not offloaded(model).pack_on_save
    with pytest.raises(PackingError, match="needs the packed format"):
        round_float_tensors_(model, torch.float16)


def model_fp_logits(folder: Path, token_ids: torch.Tensor) -> torch.Tensor:
    model, _ = load_model(folder)
    return model(token_ids).logits


def test_the_cli_quantizes_and_evaluates_offloaded(tmp_path, capsys):
    folder = save_tiny(tmp_path / "src")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"t{i % 128}" for i in range(400)))
    out = tmp_path / "q"
    assert main(["-q", "quantize", str(folder), "--offload", "--recipe", "rtn-w4a16-g64",
                 "--out", str(out), "--format", "fake"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "float weights on the quantized grid" in printed
    assert "peak resident memory" in printed
    data = ["--data", str(text), "--windows", "2", "--seqlen", "32", "--start", "0"]
    assert main(["-q", "eval", "--offload", str(out), *data]) == 0
    offloaded_ppl = capsys.readouterr().out.splitlines()[0]
    assert main(["-q", "eval", str(out), *data]) == 0
    assert capsys.readouterr().out.splitlines()[0] == offloaded_ppl  # "perplexity X on …"
    packed = tmp_path / "packed"  # packed is the default, as in memory
    assert main(["-q", "quantize", str(folder), "--offload", "--recipe", "rtn-w4a16-g64",
                 "--out", str(packed)]) == 0  # fmt: skip
    assert "21 modules packed" in capsys.readouterr().out
    assert main(["-q", "eval", str(packed), *data]) == 0
    assert capsys.readouterr().out.splitlines()[0] == offloaded_ppl
    half = tmp_path / "half"
    assert main(["-q", "quantize", str(folder), "--offload", "--recipe", "rtn-w4a16-g64",
                 "--out", str(half), "--float-dtype", "float16"]) == 0  # fmt: skip
    capsys.readouterr()
    assert "F16" in set(stored_dtypes(half).values())
    assert main(["-q", "eval", str(half), *data]) == 0
    assert capsys.readouterr().out.startswith("perplexity ")
    for flags, message in (
        (["--format", "gguf"], "--offload saves --format packed or fake"),
        (["--float-dtype", "float16", "--format", "fake"], "--float-dtype needs --format packed"),
    ):
        assert main(["quantize", str(folder), "--offload", "--recipe", "rtn-w4a16-g64",
                     "--out", str(tmp_path / "x"), *flags]) == 2  # fmt: skip
        assert message in capsys.readouterr().err


def test_a_killed_process_leaves_no_overlay_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("CHANNELWISE_HOME", str(tmp_path / "home"))
    root = tmp_path / "home" / "offload"
    here = _overlay_prefix().rsplit("-", 1)[0]  # blocks-<this machine's boot id>
    dead = root / f"{here}-{_pid_of_a_finished_process()}-abc"
    reused = root / f"{here}-{os.getpid()}-old"  # an earlier process that had our id
    live = root / f"{here}-1-live"  # process 1 runs
    elsewhere = root / f"blocks-othermachine-{_pid_of_a_finished_process()}-x"
    for folder in (dead, reused, live, elsewhere):
        folder.mkdir(parents=True)
        (folder / "block-00000.safetensors").write_bytes(b"x")
    model, _ = load_offloaded(save_tiny(tmp_path / "src"))
    assert not dead.exists() and not reused.exists()
    assert live.exists() and elsewhere.exists()
    mine = offloaded(model).overlay
    other, _ = load_offloaded(save_tiny(tmp_path / "src2"))  # this process's own: kept
    assert mine.exists() and offloaded(other).overlay != mine


def _pid_of_a_finished_process() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_an_error_inside_a_block_leaves_no_block_in_memory(tmp_path, token_ids):
    model, _ = load_offloaded(save_tiny(tmp_path / "src"))
    blocks = offloaded(model).blocks

    def fail(*_):
        raise RuntimeError("boom")

    handle = blocks[1].mlp.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        model(token_ids)
    handle.remove()
    assert materialised_blocks(model) == 0
