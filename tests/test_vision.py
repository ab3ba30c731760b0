"""Vision Transformers: the embedded DINOv2 (ONNX → transformers), Fashion-MNIST and image
folders, the frozen probe and top-1, the dinov2 adapter under the block-wise engine, and the
vision compare loop (on tiny random DINOv2 configs; the real backbone where it is cheap)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from helpers import STATIC4, tiny_dinov2_config, tiny_vision_model, write_image_folder
from PIL import Image

from channelwise.adapters import adapter_for
from channelwise.compress import quantize
from channelwise.data.images import (
    FASHION_MNIST_CLASSES,
    ImageSet,
    image_folder,
    load_images,
    read_idx,
    seeded_subset,
)
from channelwise.engine import run_blockwise
from channelwise.errors import (
    CheckpointError,
    DataSourceError,
    ModelNotFoundError,
    RecipeError,
    UnsupportedModelError,
)
from channelwise.evaluate.top1 import LinearProbe, fit_probe, image_features, score
from channelwise.quant.activation import input_quantizer
from channelwise.recipe import Recipe, load_recipe
from channelwise.vision import VisionProtocol, compare_vision, load_vision_model

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


@pytest.fixture
def tiny_dinov2_folder(tiny_dinov2, tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-dinov2"
    tiny_dinov2.save_pretrained(folder)
    return folder


# --- the embedded backbone ----------------------------------------------------------------


def test_embedded_dinov2_matches_the_onnx_model_under_onnxruntime() -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from channelwise.dinov2 import embedded_onnx

    model = load_vision_model("dinov2-small", device="cpu")
    assert adapter_for(model).family == "dinov2"
    graph = onnx.load(str(embedded_onnx()))
    final = [node for node in graph.graph.node if node.name.startswith("/backbone/layernorm/")]
    output = final[-1].output[0]  # the backbone's final LayerNorm, before the saliency decoder
    graph.graph.output.append(
        onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)
    )
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    expected = torch.from_numpy(session.run([output], {"input_image": x.numpy()})[0])
    with torch.no_grad():
        got = model(pixel_values=x).last_hidden_state
    assert got.shape == expected.shape == (1, 257, 384)
    assert (got - expected).abs().max().item() < 5e-5  # 1.05e-5 measured, outputs up to 8.3


def test_a_file_that_is_not_the_dinov2_onnx_is_refused(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from channelwise.dinov2 import dinov2_from_onnx

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 not protobuf at all \xff" * 10)
    with pytest.raises(CheckpointError):
        dinov2_from_onnx(garbage)
    weight = onnx.numpy_helper.from_array(np.ones((2, 2), np.float32), "backbone.something")
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
        initializer=[weight],
    )
    other = tmp_path / "other.onnx"
    onnx.save(onnx.helper.make_model(graph), str(other))
    with pytest.raises(CheckpointError, match="position embeddings|DINOv2"):
        dinov2_from_onnx(other)


# --- images ------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_read_idx_reads_plain_and_gzipped_files_and_refuses_malformed_ones(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    plain, zipped = tmp_path / "a.idx", tmp_path / "a.idx.gz"
    plain.write_bytes(_idx_bytes(array))
    zipped.write_bytes(gzip.compress(_idx_bytes(array)))
    for path in (plain, zipped):
        assert torch.equal(read_idx(path), torch.from_numpy(array))
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataSourceError, match="magic"):
        read_idx(bad)
    bad.write_bytes(_idx_bytes(array)[:-3])
    with pytest.raises(DataSourceError, match="data bytes"):
        read_idx(bad)
    bad.write_bytes(gzip.compress(_idx_bytes(array))[:-5])
    with pytest.raises(DataSourceError, match="cannot read"):
        read_idx(bad)


def test_fashion_mnist_comes_from_the_debian_package_whole() -> None:
    test = load_images("fashion-mnist", "test")
    assert test.images.shape == (10_000, 1, 28, 28) and test.images.dtype == torch.uint8
    assert test.classes == FASHION_MNIST_CLASSES
    assert test.labels.bincount().tolist() == [1000] * 10
    train = load_images(" Fashion-MNIST ", "train")
    assert len(train) == 60_000
    assert not torch.equal(train.images[:100], test.images[:100])


def test_pixels_replicate_grey_resize_and_normalise() -> None:
    white = torch.full((1, 1, 28, 28), 255, dtype=torch.uint8)
    images = ImageSet(white, torch.zeros(1, dtype=torch.long), ("a",), "t")
    pixels = images.pixels(0, 1, 56, MEAN, STD)
    assert pixels.shape == (1, 3, 56, 56)
    torch.testing.assert_close(pixels, torch.full_like(pixels, (1.0 - 0.5) / 0.25))


def test_seeded_subset_is_reproducible_sorted_and_without_repeats() -> None:
    images = ImageSet(torch.zeros(50, 1, 2, 2, dtype=torch.uint8), torch.arange(50), ("a",), "t")
    a, b = seeded_subset(images, 10, seed=3), seeded_subset(images, 10, seed=3)
    assert torch.equal(a.labels, b.labels)
    assert a.labels.unique().numel() == 10 and torch.equal(a.labels, a.labels.sort().values)
    assert not torch.equal(a.labels, seeded_subset(images, 10, seed=4).labels)
    assert seeded_subset(images, None, 0) is images
    with pytest.raises(DataSourceError):
        seeded_subset(images, 0, 0)


def test_calibrating_on_fewer_images_than_asked_says_so(tmp_path: Path, caplog) -> None:
    train = write_image_folder(tmp_path / "train", classes=2, per_class=1)
    test = write_image_folder(tmp_path / "test", classes=2, per_class=1)
    protocol = VisionProtocol(calib_data=str(train), eval_data=str(test), resolution=16)
    with caplog.at_level("WARNING"):
        assert protocol.with_(calib_images=2).calibration_pixels().shape[0] == 2
        assert not caplog.records
        assert protocol.with_(calib_images=50).calibration_pixels().shape[0] == 2
    assert "holds 2 training images, fewer than the 50 calibration images" in caplog.text


def test_image_folder_loads_classes_in_order(tmp_path: Path) -> None:
    images = image_folder(write_image_folder(tmp_path / "imgs"), size=16)
    assert images.classes == ("class0", "class1", "class2")
    assert images.images.shape == (24, 3, 16, 16)
    assert images.labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8


def test_bad_image_folders_get_one_line_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataSourceError, match="no class subfolders"):
        image_folder(empty)
    root = write_image_folder(tmp_path / "notes", classes=1, per_class=1)
    (root / "class0" / "readme.txt").write_text("not an image")
    with pytest.raises(DataSourceError, match="readme.txt is not an image"):
        image_folder(root)
    root = write_image_folder(tmp_path / "corrupt", classes=1, per_class=1)
    (root / "class0" / "broken.png").write_bytes(b"\x89PNG but cut")
    with pytest.raises(DataSourceError, match="cannot be read as an image"):
        image_folder(root)
    with pytest.raises(
        DataSourceError, match="neither 'fashion-mnist' nor a folder of class subfolders"
    ):
        load_images(str(tmp_path / "missing"), "test")


def test_calibrating_on_the_evaluation_images_is_refused(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "imgs")
    with pytest.raises(DataSourceError, match="never calibrate on the evaluation images"):
        VisionProtocol(calib_data=str(folder), eval_data=str(tmp_path / "imgs" / ".." / "imgs"))
    VisionProtocol()  # Fashion-MNIST: train split for calibration, test split for evaluation


# --- the probe and the metrics ------------------------------------------------------------


def test_probe_separates_separable_features_and_round_trips(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    centres = torch.randn(3, 16, generator=generator) * 4
    features = centres[labels] + torch.randn(300, 16, generator=generator)
    probe = fit_probe(features, labels, classes=3)
    result = score(features, labels, probe)
    assert result.top1 == 100.0 and result.agreement == 100.0
    assert result.feature_cosine == pytest.approx(1.0)
    probe.save(tmp_path / "probe.safetensors")
    loaded = LinearProbe.load(tmp_path / "probe.safetensors")
    torch.testing.assert_close(loaded.logits(features), probe.logits(features))
    assert loaded.ridge == probe.ridge
    with pytest.raises(CheckpointError, match="another model"):
        probe.logits(features[:, :8])
    with pytest.raises(DataSourceError, match="at least 20"):
        fit_probe(features[:5], labels[:5], classes=3)
    noisy = features + 8 * torch.randn(300, 16, generator=generator)
    worse = score(noisy, labels, probe, reference=features)
    assert worse.agreement < 100.0 and worse.feature_cosine < 1.0


# --- the adapter and the engine -----------------------------------------------------------


def test_dinov2_adapter_names_every_block_linear(tiny_dinov2) -> None:
    adapter = adapter_for(tiny_dinov2)
    assert adapter.modality == "vision" and adapter.norm_type == "layernorm"
    blocks = adapter.block_list(tiny_dinov2)
    assert len(blocks) == 2
    linears = adapter.block_linears(blocks[0])
    assert set(linears) == {
        "attention.q_proj",
        "attention.k_proj",
        "attention.v_proj",
        "attention.o_proj",
        "mlp.fc1",
        "mlp.fc2",
    }
    assert all(isinstance(m, torch.nn.Linear) for m in linears.values())
    with pytest.raises(UnsupportedModelError, match="SwiGLU"):
        adapter_for(transformers.Dinov2Model(tiny_dinov2_config(use_swiglu_ffn=True)))


def test_the_block_wise_engine_reproduces_the_vision_forward(tiny_dinov2) -> None:
    pixels = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    outputs = run_blockwise(
        tiny_dinov2,
        adapter_for(tiny_dinov2),
        pixels,
        lambda ctx: None,
        batch_size=2,
        progress=False,
    )
    with torch.no_grad():
        expected = tiny_dinov2(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(torch.cat(outputs), expected, rtol=1e-5, atol=1e-5)


def test_vit_rtn_quantizes_every_block_linear_and_its_input(tiny_dinov2) -> None:
    pixels = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = tiny_dinov2(pixel_values=pixels).last_hidden_state
    adapter = adapter_for(tiny_dinov2)
    originals = {
        n: m.weight.clone() for n, m in tiny_dinov2.named_modules() if hasattr(m, "weight")
    }
    quantize(tiny_dinov2, "vit-rtn-w4a4", pixels, progress=False)
    for block in adapter.block_list(tiny_dinov2):
        for name, linear in adapter.block_linears(block).items():
            levels = max(row.unique().numel() for row in linear.weight)
            assert 2 < levels <= 16, (name, levels)  # 4-bit codes per output channel
            quantizer = input_quantizer(linear)
            assert quantizer is not None and quantizer.qparams is not None, name  # static
            assert quantizer.qparams.scale.numel() == 1, name  # per tensor
    changed = [n for n, m in tiny_dinov2.named_modules() if n in originals
               and not torch.equal(m.weight, originals[n])]  # fmt: skip
    assert len(changed) == 12, "the 12 block linears, nothing else (patch embedding, norms)"
    with torch.no_grad():
        after = tiny_dinov2(pixel_values=pixels).last_hidden_state
    cosine = torch.nn.functional.cosine_similarity(after, before, dim=-1).mean().item()
    assert 0.5 < cosine < 0.9999


def test_bad_calibration_and_text_only_sections_are_refused_on_a_vit(tiny_dinov2) -> None:
    from channelwise.compress import plan

    with pytest.raises(DataSourceError, match="pixel values"):
        quantize(tiny_dinov2, "vit-rtn-w8a8", torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(DataSourceError, match="no samples"):
        quantize(tiny_dinov2, "vit-rtn-w8a8", torch.zeros(0, 3, 16, 16))
    for preset in ("rtn-w4a16-g64-e8", "kivi-kv4"):
        with pytest.raises(RecipeError, match="a vision model does not have"):
            plan(tiny_dinov2, load_recipe(preset))


def test_vision_recipe_needs_images(tiny_dinov2) -> None:
    with pytest.raises(RecipeError, match="or images"):
        quantize(tiny_dinov2, "vit-rtn-w8a8", None, progress=False)


# --- loading and the compare loop ---------------------------------------------------------


def test_load_vision_model_refuses_what_it_cannot_take(tmp_path: Path, tiny_dinov2) -> None:
    with pytest.raises(ModelNotFoundError, match="vision model"):
        load_vision_model(str(tmp_path / "nothing"))
    llama = tmp_path / "llama"
    transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            vocab_size=32,
        )
    ).save_pretrained(llama)
    with pytest.raises(UnsupportedModelError, match="language model"):
        load_vision_model(str(llama))
    swinv2 = tmp_path / "swinv2"
    transformers.Swinv2Config(embed_dim=16, depths=[1], num_heads=[2]).save_pretrained(swinv2)
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'swinv2'"):
        load_vision_model(str(swinv2))
    pickled = tmp_path / "pickled"
    tiny_dinov2.config.save_pretrained(pickled)
    torch.save(tiny_dinov2.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_vision_model(str(pickled))
    partial = tmp_path / "partial"
    tiny_dinov2.save_pretrained(partial)
    from safetensors.torch import load_file, save_file

    state = load_file(partial / "model.safetensors")
    del state["encoder.layer.1.mlp.fc2.weight"]
    save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing"):
        load_vision_model(str(partial))


def test_load_vision_model_draws_no_transformers_bar(
    tiny_dinov2_folder: Path, capsys: pytest.CaptureFixture
) -> None:
    """transformers' "Loading weights" bar would show through ``-q``: the loader turns it off."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    try:
        load_vision_model(tiny_dinov2_folder, "cpu")
    finally:
        enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    assert not enabled
    assert "Loading weights" not in capsys.readouterr().err


def test_compare_vision_measures_fp_first_through_one_frozen_probe(
    tiny_dinov2_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHANNELWISE_HOME", str(tmp_path / "home"))
    protocol = VisionProtocol(
        calib_data=str(write_image_folder(tmp_path / "train", seed=1)),
        eval_data=str(write_image_folder(tmp_path / "test", seed=2)),
        resolution=16,
        calib_images=6,
        probe_images=24,
        mean=MEAN,
        std=STD,
    )
    rows = compare_vision(
        ["vit-rtn-w8a8", "vit-rtn-w4a4"],
        str(tiny_dinov2_folder),
        protocol,
        device="cpu",
        progress=False,
    )
    assert [row.recipe for row in rows] == ["fp", "vit-rtn-w8a8", "vit-rtn-w4a4"]
    fp, w8, w4 = rows
    assert fp.delta_pt == 0.0 and fp.agreement == 100.0 and fp.feature_cosine == pytest.approx(1)
    assert fp.images == w8.images == 24
    assert w8.feature_cosine > w4.feature_cosine
    assert 4 < w4.weight_bits < w8.weight_bits < 16
    assert list((tmp_path / "home" / "probes").glob("*.safetensors")), "the probe is cached"
    with pytest.raises(RecipeError, match="more than once"):
        compare_vision(["fp", "fp"], str(tiny_dinov2_folder), protocol, device="cpu")


def test_a_vit_is_measured_at_its_own_size_unless_told_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ViT checkpoint fixes its input size through its position embeddings: by default the
    protocol takes the checkpoint's ``image_size`` (DINOv2 keeps 112 px); another size is run
    with the position embeddings interpolated, not refused from inside transformers."""
    monkeypatch.setenv("CHANNELWISE_HOME", str(tmp_path / "home"))
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8,
    )  # fmt: skip
    folder = tmp_path / "vit32"
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    protocol = VisionProtocol(
        calib_data=str(write_image_folder(tmp_path / "train", seed=1)),
        eval_data=str(write_image_folder(tmp_path / "test", seed=2)),
        calib_images=6, probe_images=24, mean=MEAN, std=STD,
    )  # fmt: skip
    assert protocol.for_model(config).resolution == 32
    assert protocol.for_model(tiny_dinov2_config()).resolution == 112
    assert protocol.with_(resolution=16).for_model(config).resolution == 16
    for resolution, expected in ((None, "32px"), (16, "16px")):
        rows = compare_vision(
            ["vit-rtn-w8a8"], str(folder), protocol.with_(resolution=resolution), device="cpu",
            progress=False,
        )  # fmt: skip
        assert rows[1].feature_cosine > 0.99
        assert any(expected in p.name for p in (tmp_path / "home" / "probes").iterdir())
    model = load_vision_model(folder, "cpu")
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    images = ImageSet((pixels * 40 + 128).clamp(0, 255).to(torch.uint8), torch.tensor([0, 1]),
                      ("a", "b"), "random")  # fmt: skip
    with torch.no_grad():
        direct = model(pixel_values=images.pixels(0, 2, 16, MEAN, STD),
                       interpolate_pos_encoding=True).last_hidden_state  # fmt: skip
    features = image_features(model, images, 16, MEAN, STD, progress=False)
    torch.testing.assert_close(features[:, :32], direct[:, 0])


def test_image_features_refuse_non_finite_activations(tiny_dinov2) -> None:
    with torch.no_grad():
        tiny_dinov2.encoder.layer[0].mlp.fc2.bias.fill_(float("nan"))
    images = ImageSet(
        torch.zeros(2, 3, 16, 16, dtype=torch.uint8), torch.zeros(2).long(), ("a",), "t"
    )
    from channelwise.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match="NaN/inf"):
        image_features(tiny_dinov2, images, 16, MEAN, STD, progress=False)


def test_cli_vision_writes_rows_and_refuses_bad_input_in_one_line(
    tiny_dinov2_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    import json

    from channelwise.cli import main

    monkeypatch.setenv("CHANNELWISE_HOME", str(tmp_path / "home"))
    train = write_image_folder(tmp_path / "train", seed=1)
    test = write_image_folder(tmp_path / "test", seed=2)
    common = ["-q", "--device", "cpu", "vision", "--model", str(tiny_dinov2_folder)]
    common += ["--calib-data", str(train), "--resolution", "16", "--calib-images", "6"]
    out = tmp_path / "rows.json"
    argv = common + ["--eval-data", str(test), "--recipes", "vit-rtn-w8a8", "--json", str(out)]
    argv += ["--plot", str(tmp_path / "vision.png")]
    assert main(argv) == 0
    assert Image.open(tmp_path / "vision.png").size[0] > 500
    rows = json.loads(out.read_text())
    assert set(rows) == {"fp", "vit-rtn-w8a8", "_meta"}
    assert rows["fp"]["agreement"] == 100.0 and rows["fp"]["images"] == 24
    assert "| `vit-rtn-w8a8` | W8A8KV8 |" in capsys.readouterr().out
    assert main(common + ["--eval-data", str(train)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "never calibrate" in err and "\n" not in err
    assert main(common + ["--eval-data", str(test), "--model", str(tmp_path / "nope")]) == 2
    assert "vision model" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    notes = write_image_folder(tmp_path / "notes", seed=3)
    (notes / "class1" / "readme.txt").write_text("not an image")
    other = write_image_folder(tmp_path / "other", classes=4, seed=4)
    swinv2 = tmp_path / "swinv2"
    transformers.Swinv2Config(embed_dim=16, depths=[1], num_heads=[2]).save_pretrained(swinv2)
    refusals = {
        "no class subfolders": ["--eval-data", str(empty)],
        "readme.txt is not an image": ["--eval-data", str(notes)],
        "classes differ (in one only: class3)": ["--eval-data", str(other)],
        "unsupported architecture 'swinv2'": ["--eval-data", str(test), "--model", str(swinv2)],
    }
    for message, extra in refusals.items():
        assert main(common + extra) == 2, message
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_cli_quantize_saves_a_vit_with_its_static_attention_ranges(
    tiny_dinov2_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    from channelwise.cli import main
    from channelwise.deploy.packed import PackedLinear
    from channelwise.quant.attention import LogSqrt2Quantizer, attention_quantizers

    monkeypatch.setenv("CHANNELWISE_HOME", str(tmp_path / "home"))
    train = write_image_folder(tmp_path / "train", seed=1)
    out = tmp_path / "vit-w4a4"
    argv = ["-q", "--device", "cpu", "quantize", str(tiny_dinov2_folder), "--recipe"]
    argv += ["repq-vit-w4a4", "--calib-data", str(train), "--calib-samples", "6"]
    assert main(argv + ["--out", str(out)]) == 0
    assert "repq-vit-w4a4: calibrated" in capsys.readouterr().out
    loaded = load_vision_model(out, "cpu")
    assert sum(isinstance(m, PackedLinear) for m in loaded.modules()) == 12
    probs = attention_quantizers(loaded.encoder.layer[1].attention).probs
    assert isinstance(probs, LogSqrt2Quantizer) and probs.calibrated
    for bad, message in (
        (["--format", "gguf"], "holds language models"),
        (["--seqlen", "64"], "--seqlen is for text models"),
    ):
        assert main(argv + ["--out", str(tmp_path / "other"), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("family", ["vit", "deit", "swin"])
def test_vit_deit_and_swin_compress_exactly_like_dinov2(family: str, tmp_path: Path) -> None:
    """The engine reproduces the forward (Swin's patch merging run between its stages),
    RepQ-ViT's reparameterization is exact in float, and a compressed model saves and loads back
    identically; a classification checkpoint loads as its backbone."""
    from channelwise.compress import save_quantized
    from channelwise.deploy.packed import use_kernels

    model = tiny_vision_model(family)
    pixels = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected = model(pixel_values=pixels).last_hidden_state
    outputs = run_blockwise(model, adapter_for(model), pixels, lambda ctx: None, progress=False)
    blocks_out = torch.cat(outputs)
    with torch.no_grad():
        assert torch.allclose(model.layernorm(blocks_out), expected, atol=1e-5)
    quantize(model, _repq_only(), pixels, progress=False)
    assert adapter_for(model).family == family
    _without_input_quantizers(model)
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values=pixels).last_hidden_state, expected, rtol=1e-4, atol=1e-4
        )
    fresh = tiny_vision_model(family)
    quantize(fresh, "repq-vit-w4a4", pixels, progress=False)
    with torch.no_grad():
        quantized = fresh(pixel_values=pixels).last_hidden_state
    before = use_kernels(False)
    try:
        loaded = load_vision_model(save_quantized(fresh, None, tmp_path / "out"), "cpu")
        with torch.no_grad():
            assert torch.equal(loaded(pixel_values=pixels).last_hidden_state, quantized)
    finally:
        use_kernels(before)
    prefix = {"vit": "ViT", "deit": "DeiT", "swin": "Swin"}[family]
    head = getattr(transformers, f"{prefix}ForImageClassification")
    torch.manual_seed(0)
    classifier = head(tiny_vision_model(family).config).eval()  # Swin's drop-path is random
    classifier.save_pretrained(tmp_path / "classifier")
    backbone = load_vision_model(tmp_path / "classifier", "cpu")
    base = getattr(classifier, classifier.base_model_prefix)
    with torch.no_grad():
        torch.testing.assert_close(
            backbone(pixel_values=pixels).last_hidden_state,
            base(pixel_values=pixels).last_hidden_state,
        )


# --- attention through channelwise's implementation, and RepQ-ViT ----------------------------


@pytest.mark.parametrize("family", ["dinov2", "swin"])
@pytest.mark.parametrize("probs", [False, True], ids=["sdpa-path", "softmax-path"])
def test_channelwise_attention_matches_eager_in_a_vision_transformer(family, probs) -> None:
    """No causal mask in a ViT; Swin hands its attention an additive float mask (relative-position
    bias plus the shifted-window mask), which both of channelwise's paths add as eager attention
    does (turning it into a boolean mask, as the softmax path once did, fails here)."""
    from channelwise.quant.attention import AttentionQuantizers, install_attention_quantizers

    model = tiny_vision_model(family)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        expected = model(pixel_values=pixels).last_hidden_state
    adapter = adapter_for(model)
    modules = [b.get_submodule(adapter.attention_module) for b in adapter.block_list(model)]
    identity = AttentionQuantizers(probs=lambda x: x) if probs else AttentionQuantizers()
    install_attention_quantizers(model, modules, identity)
    with torch.no_grad():
        got = model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _repq_only(**args):

    step = {"method": "repq_vit", "args": {"softmax": "none", **args}}
    return Recipe.from_dict({"name": "repq-only", "activations": STATIC4, "steps": [step]})


def _without_input_quantizers(model) -> None:
    from channelwise.quant.activation import remove_input_quantizer

    for module in model.modules():
        remove_input_quantizer(module)


def test_repq_reparameterization_is_exact_in_float(tiny_dinov2) -> None:
    pixels = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = tiny_dinov2(pixel_values=pixels).last_hidden_state
        gamma = tiny_dinov2.encoder.layer[0].norm1.weight.clone()
    quantize(tiny_dinov2, _repq_only(), pixels, progress=False)
    assert not torch.equal(tiny_dinov2.encoder.layer[0].norm1.weight, gamma), "nothing moved"
    _without_input_quantizers(tiny_dinov2)
    with torch.no_grad():
        got = tiny_dinov2(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_repq_per_tensor_codes_equal_the_per_channel_codes_before(tiny_dinov2) -> None:
    """The paper's claim: with an integer z̃, per-tensor (s̃, z̃) codes of the reparameterized
    input are the per-channel (s, z) codes of the original one."""
    from copy import deepcopy
    from dataclasses import replace

    from channelwise.engine import run_until
    from channelwise.quant.activation import input_quantizer
    from channelwise.quant.core import compute_qparams
    from channelwise.quant.core import quantize as codes_of
    from channelwise.quant.granularity import PerColumn

    pixels = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    reference = deepcopy(tiny_dinov2)
    name = "encoder.layer.0.attention.q_proj"  # its input sees no quantizer before it
    x = run_until(reference.get_submodule(name), "input", lambda: reference(pixel_values=pixels))
    quantize(tiny_dinov2, _repq_only(), pixels, progress=False)
    quantizer = input_quantizer(tiny_dinov2.get_submodule(name))
    _without_input_quantizers(tiny_dinov2)
    x_new = run_until(
        tiny_dinov2.get_submodule(name), "input", lambda: tiny_dinov2(pixel_values=pixels)
    )
    rows, rows_new = x.reshape(-1, x.shape[-1]), x_new.reshape(-1, x.shape[-1])
    channel_spec = replace(quantizer.spec, granularity=PerColumn())
    per_channel = codes_of(rows, compute_qparams(rows, channel_spec), channel_spec)
    per_tensor = codes_of(rows_new, quantizer.qparams, quantizer.spec)
    assert quantizer.qparams.scale.numel() == 1 and float(quantizer.qparams.zero_point).is_integer()
    same = (per_channel == per_tensor).float().mean().item()
    assert same > 0.999 and (per_channel.int() - per_tensor.int()).abs().max() <= 1


def _repq_with_target(target: str, weights: bool, offsets: bool):
    """RepQ-ViT on a tiny DINOv2 with a 40× outlier channel (and, with ``offsets``, channels
    shifted far off zero): block 0's q_proj input grid and the model's outputs."""
    from channelwise.quant.activation import input_quantizer

    pixels = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model = tiny_vision_model("dinov2")
    with torch.no_grad():
        norm = model.encoder.layer[0].norm1
        norm.weight[3] *= 40.0  # one wide channel: the mean scale ≠ the median scale
        if offsets:
            norm.bias[:12] += 6.0  # channels off zero: the mean zero point ≠ the median one
    step = {"method": "repq_vit", "args": {"softmax": "none", "target": target}}
    data = {"name": f"repq-{target}", "activations": STATIC4, "steps": [step]}
    if weights:
        data["weights"] = {"bits": 4, "symmetric": False, "granularity": "channel", "range": "mse"}
        data["steps"] = [step, {"method": "rtn"}]
    quantize(model, Recipe.from_dict(data), pixels, progress=False)
    qparams = input_quantizer(model.encoder.layer[0].attention.q_proj).qparams
    with torch.no_grad():
        out = model(pixel_values=pixels).last_hidden_state
    return float(qparams.scale), float(qparams.zero_point), out


def test_repq_target_scale_keeps_the_codes_and_only_its_zero_point_meets_the_weights() -> None:
    """DopQ-ViT's median target (MOSF) against RepQ-ViT's mean. Any integer (s̃, z̃) keeps the
    per-channel codes, so with float weights the model is the same; s̃ alone rescales W·diag(r1)
    by one constant, which the per-channel weight grid follows; z̃ reaches the output through
    the quantized weights' error times (q − z̃)."""

    def relative(a, b):
        return ((a - b).abs().max() / a.abs().max()).item()

    for offsets in (False, True):
        mean, median = (_repq_with_target(t, False, offsets) for t in ("mean", "median"))
        assert median[0] < 0.9 * mean[0], (mean[:2], median[:2])
        assert relative(mean[2], median[2]) < 1e-5
    mean, median = (_repq_with_target(t, True, False) for t in ("mean", "median"))
    assert median[0] < 0.9 * mean[0] and median[1] == mean[1], (mean[:2], median[:2])
    assert relative(mean[2], median[2]) < 1e-5  # s̃ alone: the same quantized model
    mean, median = (_repq_with_target(t, True, True) for t in ("mean", "median"))
    assert median[1] != mean[1], (mean[:2], median[:2])
    assert relative(mean[2], median[2]) > 1e-4  # another z̃: another quantized model


def test_repq_rescues_a_post_layernorm_outlier_channel(tiny_dinov2) -> None:
    from copy import deepcopy

    with torch.no_grad():
        for layer in tiny_dinov2.encoder.layer:
            for norm in (layer.norm1, layer.norm2):
                norm.weight[3] *= 40.0  # one channel 40× wider than the rest, as in real ViTs
                norm.bias[5] += 8.0
    pixels = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = tiny_dinov2(pixel_values=pixels).last_hidden_state
    from channelwise.quant.activation import remove_input_quantizer

    errors = {}
    plain = Recipe.from_dict({"name": "a4", "activations": STATIC4})
    for name, recipe in (("per-tensor", plain), ("repq", _repq_only())):
        model = deepcopy(tiny_dinov2)
        quantize(model, recipe, pixels, progress=False)
        for layer in model.encoder.layer:  # keep only the post-LayerNorm inputs quantized
            remove_input_quantizer(layer.attention.o_proj)
            remove_input_quantizer(layer.mlp.fc2)
        with torch.no_grad():
            got = model(pixel_values=pixels).last_hidden_state
        errors[name] = ((got - expected).norm() / expected.norm()).item()
    assert errors["repq"] < 0.6 * errors["per-tensor"], errors


def test_repq_recipe_errors_are_clear(tiny_dinov2) -> None:
    from channelwise.compress import plan

    dynamic = dict(STATIC4, dynamic=True, granularity="token")
    with pytest.raises(RecipeError, match="static asymmetric activations"):
        plan(
            tiny_dinov2,
            Recipe.from_dict({"activations": dynamic, "steps": [{"method": "repq_vit"}]}),
        )
    late = {
        "weights": {"bits": 4, "symmetric": False},
        "activations": STATIC4,
        "steps": [{"method": "rtn"}, {"method": "repq_vit"}],
    }
    with pytest.raises(RecipeError, match="before weight quantization"):
        plan(tiny_dinov2, Recipe.from_dict(late))
    with pytest.raises(RecipeError, match="softmax"):
        plan(tiny_dinov2, _repq_only(softmax="uniform"))
    float_min = dict(STATIC4, zero_point="float")
    repq = [{"method": "repq_vit"}]
    with pytest.raises(RecipeError, match="integer zero points"):
        plan(tiny_dinov2, Recipe.from_dict({"activations": float_min, "steps": repq}))
    with pytest.raises(RecipeError, match="attention.probs"):
        plan(tiny_dinov2, Recipe.from_dict({"activations": STATIC4, "attention": {"probs": STATIC4},
                                            "steps": [{"method": "repq_vit"}]}))  # fmt: skip


@pytest.mark.parametrize("family", ["dinov2", "swin"])
def test_a_packed_vision_model_saves_and_loads_back_identically(family, tmp_path: Path) -> None:
    from channelwise.compress import save_quantized
    from channelwise.deploy import pack_model
    from channelwise.deploy.packed import PackedLinear, use_kernels

    model = tiny_vision_model(family)
    linears = 6 * len(adapter_for(model).block_list(model))
    pixels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    quantize(model, "rtn-w8a8", pixels, progress=False)
    with torch.no_grad():
        expected = model(pixel_values=pixels).last_hidden_state
    assert len(pack_model(model)) == linears
    before = use_kernels(False)  # the reference path: bit-identical to fake-quant
    try:
        with torch.no_grad():
            assert torch.equal(model(pixel_values=pixels).last_hidden_state, expected)
        saved = save_quantized(model, None, tmp_path / "out")
        loaded = load_vision_model(saved, "cpu")
        assert sum(isinstance(m, PackedLinear) for m in loaded.modules()) == linears
        with torch.no_grad():
            assert torch.equal(loaded(pixel_values=pixels).last_hidden_state, expected)
    finally:
        use_kernels(before)
    with torch.no_grad():  # the int8 kernels: within float rounding of the reference
        got = loaded(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(RecipeError, match="compressed output"):
        compare_vision(["fp"], str(saved), device="cpu")


def test_cli_inspect_draws_a_vits_channels_and_softmax(
    tiny_dinov2_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from channelwise.cli import main
    from channelwise.vision import is_vision_model

    assert is_vision_model("dinov2-small") and is_vision_model(str(tiny_dinov2_folder))
    assert not is_vision_model("smollm2-135m") and not is_vision_model(str(tmp_path))
    train = write_image_folder(tmp_path / "train")
    out = tmp_path / "inspect.png"
    argv = ["-q", "--device", "cpu", "inspect", str(tiny_dinov2_folder), "--calib-data"]
    argv += [str(train), "--calib-samples", "6", "--recipe", "repq-vit-w4a4", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "after repq-vit-w4a4" in printed and "mlp_in" in printed
    for path in (out, tmp_path / "inspect-softmax.png"):
        assert path.read_bytes()[:4] == b"\x89PNG"
    assert main(argv[:-1] + [str(tmp_path / "x.png"), "--seqlen", "8"]) == 2
    assert "--seqlen is for text models" in capsys.readouterr().err


def test_cli_prepare_caches_a_vision_model_and_its_images(
    tiny_dinov2_folder: Path, capsys: pytest.CaptureFixture
) -> None:
    from channelwise.cli import main

    assert main(["prepare", str(tiny_dinov2_folder)]) == 0
    printed = capsys.readouterr().out
    assert f"model ready at {tiny_dinov2_folder}" in printed and "Fashion-MNIST ready" in printed
