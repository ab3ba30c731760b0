"""Bad input to the Python API gets a one-line ChannelwiseError before any change, never a
traceback from inside torch or transformers (cases found by a sweep of the public functions)."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import VOCAB, build_tiny_model, build_tiny_tokenizer
from helpers import tiny_vision_model

from channelwise import load_model, load_recipe, perplexity, quantize
from channelwise.compare import compare
from channelwise.deploy import generate_text
from channelwise.errors import (
    ChannelwiseError,
    CheckpointError,
    DataSourceError,
    DeviceError,
    NonFiniteError,
    RecipeError,
    UnsupportedModelError,
)
from channelwise.models import resolve_device
from channelwise.state import FAILED_ATTR, RECIPE_ATTR

IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("windows", "message"),
    [
        (IDS + VOCAB, f"token id {int(IDS.max()) + VOCAB}, outside the model's vocabulary"),
        (IDS - VOCAB, "outside the model's vocabulary"),
        (IDS.float(), "must be integer token ids"),
        (IDS > 3, "must be integer token ids"),
        (IDS[0], "must be integer token ids"),
        (IDS[:, :1], "need at least one sequence of 2 or more tokens"),
        (IDS[:0], "need at least one sequence"),
        (IDS.tolist(), "must be integer token ids"),
    ],
)
def test_perplexity_refuses_windows_it_cannot_score(windows, message) -> None:
    with pytest.raises(DataSourceError, match=message):
        perplexity(build_tiny_model("llama"), windows, progress=False)


def test_perplexity_takes_int32_ids_and_refuses_a_bad_batch_or_a_headless_model() -> None:
    model = build_tiny_model("llama")
    expected = perplexity(model, IDS, progress=False)
    assert perplexity(model, IDS.int(), progress=False) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(DataSourceError, match="batch_size must be at least 1"):
        perplexity(model, IDS, batch_size=0, progress=False)
    with pytest.raises(UnsupportedModelError, match="needs a language model with its output"):
        perplexity(tiny_vision_model("dinov2"), IDS, progress=False)


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        (IDS + VOCAB, "calibration token ids hold token id"),
        (IDS > 3, "must be integer token ids"),
        (IDS[:, :0], "need at least one sequence of 1 or more tokens"),
    ],
)
def test_quantize_refuses_calibration_ids_outside_the_vocabulary(calibration, message) -> None:
    model = build_tiny_model("llama")
    with pytest.raises(DataSourceError, match=message):
        quantize(model, "smoothquant-w8a8", calibration, progress=False)
    assert getattr(model, RECIPE_ATTR, None) is None


def test_quantize_refuses_images_smaller_than_a_patch() -> None:
    model = tiny_vision_model("dinov2")
    patch = model.config.patch_size
    with pytest.raises(DataSourceError, match=f"smaller than one {patch}-pixel patch"):
        quantize(model, "vit-rtn-w8a8", torch.randn(2, 3, patch - 1, patch - 1), progress=False)


def test_a_bad_device_or_batch_is_refused_before_the_model_changes() -> None:
    """quarot rotated 16 tensors before a bad device string failed inside torch."""
    model = build_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        quantize(model, "quarot-rtn-w8a8", IDS, device="gpu", progress=False)
    with pytest.raises(DataSourceError, match="batch_size must be at least 1"):
        quantize(model, "quarot-rtn-w8a8", IDS, batch_size=0, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert resolve_device(None) == resolve_device("auto")


def test_a_recipe_may_be_a_mapping_and_nothing_else_unnamed() -> None:
    model = build_tiny_model("llama")
    quantize(model, {"weights": {"bits": 8}, "steps": [{"method": "rtn"}]}, progress=False)
    assert getattr(model, RECIPE_ATTR).weights.bits == 8
    with pytest.raises(RecipeError, match="a preset name, a YAML file path, a mapping"):
        load_recipe(None)


def test_compare_refuses_bad_counts_before_loading_anything() -> None:
    with pytest.raises(ChannelwiseError, match="kv_tokens must be at least 1, got 0"):
        compare(["fp"], "/nonexistent/model", kv_tokens=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": None}, "the prompt must be non-empty text"),
        ({"tokenizer": None}, "a tokenizer is needed"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
    ],
)
def test_generate_text_refuses_bad_arguments(kwargs, message) -> None:
    args = {"tokenizer": build_tiny_tokenizer(), "prompt": "t1 t2", "max_new_tokens": 2, **kwargs}
    with pytest.raises(ChannelwiseError, match=message):
        generate_text(build_tiny_model("llama"), chat=False, **args)


def test_a_model_without_its_head_is_named() -> None:
    config = build_tiny_model("llama").config
    with pytest.raises(UnsupportedModelError, match="LlamaModel does not hold 'llama' blocks"):
        quantize(transformers.LlamaModel(config), "rtn-w8a16", progress=False)


def test_a_checkpoint_with_more_blocks_than_its_config_is_refused(tmp_path) -> None:
    """transformers built the shorter model and dropped the extra block, naming it only in its
    load report."""
    import json

    folder = tmp_path / "tiny"
    build_tiny_model("llama", num_hidden_layers=2).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="blocks beyond the config's num_hidden_layers = 1"):
        load_model(folder, device="cpu")


def test_saving_a_language_model_without_its_tokenizer_warns(tmp_path, caplog) -> None:
    """``load_model`` reads the tokenizer from the folder: without one the folder did not load
    back, and nothing said so when it was written."""
    from channelwise import save_quantized

    model = build_tiny_model("llama")
    quantize(model, "rtn-w8a16", progress=False)
    with caplog.at_level("WARNING"):
        save_quantized(model, build_tiny_tokenizer(), tmp_path / "with")
        assert not caplog.records
        save_quantized(model, None, tmp_path / "without")
    assert "without a tokenizer: load_model reads one from the folder" in caplog.text
    with pytest.raises(ChannelwiseError, match="tokenizer must be a transformers tokenizer"):
        save_quantized(model, "gpt2", tmp_path / "str")
    assert not (tmp_path / "str").exists()


def test_a_quantize_that_fails_partway_says_the_model_changed_and_refuses_a_retry() -> None:
    model = build_tiny_model("llama")
    last = model.model.layers[-1].mlp.down_proj
    last.weight.data[0, 0] = float("inf")  # the earlier blocks are quantized before this one fails
    first = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    with pytest.raises(NonFiniteError, match=r"load a fresh copy before another attempt\)$"):
        quantize(model, "rtn-w8a8", IDS, progress=False)
    assert getattr(model, FAILED_ATTR) == "rtn-w8a8"
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, first)  # what it warns of
    assert getattr(model, RECIPE_ATTR, None) is None
    with pytest.raises(
        ChannelwiseError, match="a failed quantize with 'rtn-w8a8' may have changed"
    ):
        quantize(model, "rtn-w8a8", IDS, progress=False)
    quantize(build_tiny_model("llama"), "rtn-w8a8", IDS, progress=False)  # a fresh copy works
