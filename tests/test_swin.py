"""Swin Transformers: every Vision Transformer method runs across its stages and patch merging.

The tiny Swin has two stages of two blocks (the second in shifted windows), a patch merging
between them, and random relative-position biases (tests/helpers.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import STATIC4, tiny_vision_model, write_image_folder

from channelwise.adapters import adapter_for
from channelwise.compress import quantize, save_quantized
from channelwise.data.images import ImageSet
from channelwise.engine import run_blockwise
from channelwise.evaluate.top1 import image_features
from channelwise.recipe import Recipe
from channelwise.vision import load_vision_model

WEIGHTS4 = {"bits": 4, "symmetric": False, "granularity": "channel", "range": "mse"}
ATTENTION4 = {"q": STATIC4, "k": STATIC4, "v": STATIC4}


def _recipe(method: str, **args) -> Recipe:
    spec = {"name": f"{method}-swin-test", "steps": [{"method": method, "args": args}]}
    if method in ("ias_vit", "repquant", "lrp_qvit"):
        spec |= {"weights": WEIGHTS4, "activations": STATIC4, "attention": ATTENTION4}
    return Recipe.from_dict(spec)


def _pixels(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _weights(model) -> dict[str, torch.Tensor]:
    adapter = adapter_for(model)
    return {
        f"{adapter.block_path(i)}.{name}": module.weight.detach().clone()
        for i, block in enumerate(adapter.block_list(model))
        for name, module in adapter.block_linears(block).items()
    }


def test_the_adapter_lists_every_stages_blocks_and_merges_between_stages() -> None:
    model = tiny_vision_model("swin")
    adapter = adapter_for(model)
    assert [adapter.block_path(i) for i in range(4)] == [
        "encoder.layers.0.blocks.0", "encoder.layers.0.blocks.1",
        "encoder.layers.1.blocks.0", "encoder.layers.1.blocks.1",
    ]  # fmt: skip
    stages = [*model.encoder.layers[0].blocks, *model.encoder.layers[1].blocks]
    assert all(a is b for a, b in zip(adapter.block_list(model), stages, strict=True))
    pixels = _pixels(5)
    outputs = run_blockwise(model, adapter, pixels, lambda ctx: None, batch_size=2, progress=False)
    assert [tuple(o.shape) for o in outputs] == [(2, 16, 32), (2, 16, 32), (1, 16, 32)]
    with torch.no_grad():
        expected = model(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(model.layernorm(torch.cat(outputs)), expected)


CASES = {
    "vit-rtn-w4a4": "vit-rtn-w4a4",
    "repq-vit-w4a4": "repq-vit-w4a4",
    "ias_vit": _recipe("ias_vit", iters=3, batch_size=8),
    "repquant": _recipe("repquant", iters=3, batch_size=8),
    "lrp_qvit": _recipe("lrp_qvit", batch_size=8),
    "bivit": _recipe("bivit", steps=3, batch_size=8),
    "lpvit": _recipe("lpvit", flops=0.6, block=[8, 8]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_vit_method_runs_on_swin_and_reloads_bit_identically(case, tmp_path: Path):
    """Each method changes the weights of every stage's blocks (the trained ones read their
    float targets through the patch merging), the model stays close to float, and its saved
    folder loads back computing the same outputs."""
    model = tiny_vision_model("swin")
    pixels = _pixels()
    before = _weights(model)
    with torch.no_grad():
        reference = model(pixel_values=pixels).last_hidden_state
    quantize(model, CASES[case], pixels, progress=False)
    after = _weights(model)
    changed = {
        name.split(".blocks.")[0] for name in before if not torch.equal(before[name], after[name])
    }
    assert changed == {"encoder.layers.0", "encoder.layers.1"}
    with torch.no_grad():
        out = model(pixel_values=pixels).last_hidden_state
    cosine = torch.nn.functional.cosine_similarity(out.flatten(1), reference.flatten(1))
    assert cosine.min() > (0.5 if case == "bivit" else 0.95)
    loaded = load_vision_model(save_quantized(model, None, tmp_path / "out"), "cpu")
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).last_hidden_state, out)


def test_swin_features_are_the_mean_of_all_tokens() -> None:
    """No class token: the probe reads the mean of the last hidden state, as Swin's pooler."""
    model = tiny_vision_model("swin")
    grey = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    images = ImageSet(grey, torch.tensor([0, 1, 0]), ("a", "b"), "random")
    features = image_features(model, images, 16, (0.5,) * 3, (0.25,) * 3, progress=False)
    pixels = images.pixels(0, 3, 16, (0.5,) * 3, (0.25,) * 3)
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state
    assert features.shape == (3, 32)
    torch.testing.assert_close(features, hidden.mean(dim=1))


def test_cli_compares_and_inspects_a_local_swin_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A user's Swin folder goes through ``channelwise vision`` (fp measured first, one probe)
    and ``channelwise inspect`` as a ViT does."""
    import json

    from channelwise.cli import main

    monkeypatch.setenv("CHANNELWISE_HOME", str(tmp_path / "home"))
    folder = tmp_path / "tiny-swin"
    tiny_vision_model("swin").save_pretrained(folder)
    train = write_image_folder(tmp_path / "train", seed=1)
    test = write_image_folder(tmp_path / "test", seed=2)
    out = tmp_path / "rows.json"
    argv = ["-q", "--device", "cpu", "vision", "--model", str(folder), "--calib-data", str(train)]
    argv += ["--eval-data", str(test), "--resolution", "16", "--calib-images", "6"]
    argv += ["--plot", str(tmp_path / "vision.png")]
    assert main(argv + ["--recipes", "vit-rtn-w8a8,repq-vit-w4a4", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert rows["fp"]["agreement"] == 100.0 and rows["fp"]["images"] == 24
    assert rows["vit-rtn-w8a8"]["feature_cosine"] > rows["repq-vit-w4a4"]["feature_cosine"]
    picture = tmp_path / "inspect.png"
    assert (
        main(
            [
                "-q",
                "--device",
                "cpu",
                "inspect",
                str(folder),
                "--calib-data",
                str(train),
                "--calib-samples",
                "6",
                "--recipe",
                "repq-vit-w4a4",
                "--out",
                str(picture),
            ]
        )
        == 0
    )
    assert "after repq-vit-w4a4" in capsys.readouterr().out
    for path in (picture, tmp_path / "inspect-softmax.png"):
        assert path.read_bytes()[:4] == b"\x89PNG"


def test_images_too_small_for_the_last_stages_window_are_one_clear_error() -> None:
    """transformers' Swin cannot shrink a window below its relative-position table: refused
    before any forward, naming the smallest size that works (checked here against the model)."""
    from channelwise.errors import DataSourceError

    model = tiny_vision_model("swin")  # patch 2, window 2, one merge: at least 8 px
    with torch.no_grad():
        model(pixel_values=torch.randn(1, 3, 8, 8))
        with pytest.raises(RuntimeError):
            tiny_vision_model("swin")(pixel_values=torch.randn(1, 3, 4, 4))
    with pytest.raises(DataSourceError, match=r"2×2-token windows.*at least 8 px"):
        quantize(model, "vit-rtn-w8a8", torch.randn(2, 3, 4, 4), progress=False)
    grey = torch.zeros(2, 1, 16, 16, dtype=torch.uint8)
    images = ImageSet(grey, torch.tensor([0, 1]), ("a", "b"), "zeros")
    with pytest.raises(DataSourceError, match="last stage 1 tokens wide"):
        image_features(model, images, 4, (0.5,) * 3, (0.25,) * 3, progress=False)


def test_lpvit_weighs_each_linear_by_the_tokens_its_stage_processes() -> None:
    """A Swin's first stage runs 4× the tokens of its second: the FLOPs share LPViT keeps is
    counted with them (counting weights alone, as for a ViT, would misstate it)."""
    model = tiny_vision_model("swin")
    recipe = _recipe("lpvit", flops=0.6, block=[4, 4])
    method = quantize(model, recipe, _pixels(8), progress=False).methods[0]
    adapter = adapter_for(model)
    tokens = [64, 64, 16, 16]  # 8×8 patches, then 4×4 after the merge
    kept = total = weights_kept = weights = 0
    for index, block in enumerate(adapter.block_list(model)):
        for module in adapter.block_linears(block).values():
            nonzero = int(module.weight.ne(0).sum())
            kept += nonzero * tokens[index]
            total += module.weight.numel() * tokens[index]
            weights_kept += nonzero
            weights += module.weight.numel()
    assert method.kept_flops == pytest.approx(kept / total, abs=1e-9)
    assert method.kept_flops == pytest.approx(0.6, abs=0.03)
    assert abs(weights_kept / weights - kept / total) > 0.01


@pytest.mark.parametrize(
    ("case", "reparameterized"),
    [("repq-vit-w4a4", True), ("vit-rtn-w4a4", False), ("ias_vit", True), ("repquant", True),
     ("lrp_qvit", True), ("bivit", None)],
)  # fmt: skip
def test_the_patch_merging_is_quantized_where_every_step_handles_it(case, reparameterized):
    """RepQ-ViT (``repq-vit``) quantizes the merging's ``reduction`` as the paper does: its
    LayerNorm reparameterized into it (a bias created where it had none), its weights on the
    grid, its input static per tensor; RTN (``vit-rtn``) without the reparameterization; I&S-ViT
    and RepQuant, which train whole blocks, as RepQ-ViT does (untrained); LRP-QViT as one more
    layer of its allocation, at the bits it allocates it. BiViT, which trains the whole
    backbone, leaves it in float (``reparameterized`` None)."""
    from channelwise.quant.activation import input_quantizer
    from channelwise.quant.granularity import PerTensor
    from channelwise.quant.grid import weight_grid

    quantized = reparameterized is not None
    model = tiny_vision_model("swin")
    merge = model.encoder.layers[0].downsample
    weight, gain = merge.reduction.weight.detach().clone(), merge.norm.weight.detach().clone()
    quantize(model, CASES[case], _pixels(), progress=False)
    quantizer = input_quantizer(merge.reduction)
    assert (quantizer is not None) == quantized
    assert torch.equal(merge.reduction.weight, weight) != quantized
    assert model.encoder.layers[1].downsample is None
    if not quantized:
        return
    assert quantizer.qparams is not None and isinstance(quantizer.spec.granularity, PerTensor)
    bits = weight_grid(merge.reduction).spec.bits  # LRP-QViT's allocation; else the recipe's 4
    assert bits == 4 or case == "lrp_qvit"
    assert all(len(row.unique()) <= 2**bits for row in merge.reduction.weight)
    assert (not torch.equal(merge.norm.weight, gain)) == reparameterized
    assert (merge.reduction.bias is not None) == reparameterized


def test_a_packed_swin_carries_the_bias_its_merge_reparameterization_created(tmp_path: Path):
    """The config builds ``reduction`` without a bias; the packed loader gives it the one the
    checkpoint holds, and still refuses any other tensor the model lacks."""
    from safetensors.torch import load_file, save_file

    from channelwise.deploy import pack_model
    from channelwise.deploy.packed import use_kernels
    from channelwise.errors import CheckpointError

    model = tiny_vision_model("swin")
    pixels = _pixels()
    quantize(model, "repq-vit-w4a4", pixels, progress=False)
    with torch.no_grad():
        expected = model(pixel_values=pixels).last_hidden_state
    pack_model(model)
    before = use_kernels(False)
    try:
        saved = save_quantized(model, None, tmp_path / "packed")
        loaded = load_vision_model(saved, "cpu")
        assert loaded.encoder.layers[0].downsample.reduction.bias is not None
        with torch.no_grad():
            assert torch.equal(loaded(pixel_values=pixels).last_hidden_state, expected)
    finally:
        use_kernels(before)
    weights = saved / "model.safetensors"
    state = load_file(weights)
    state["encoder.layers.0.downsample.reduction.scale"] = torch.ones(32)
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="tensors the model does not have"):
        load_vision_model(saved, "cpu")


def test_lrp_qvit_allocates_bits_to_the_merge_and_counts_its_weights() -> None:
    """The merging's ``reduction`` is scored and allocated like a block layer (keyed by the
    block it follows), rounded at its bits, and counted in the reported bits per weight."""
    from channelwise.quant.grid import stored_bits, weight_grid

    model = tiny_vision_model("swin")
    result = quantize(model, CASES["lrp_qvit"], _pixels(), progress=False)
    method = result.methods[0]
    assert (1, "merge") in method.scores and method.scores[(1, "merge")] > 0
    reduction = model.encoder.layers[0].downsample.reduction
    bits = method.bits[(1, "merge")]
    assert weight_grid(reduction).spec.bits == bits
    assert all(len(row.unique()) <= 2**bits for row in reduction.weight)
    adapter = adapter_for(model)
    linears = [m for b in adapter.block_list(model) for m in adapter.block_linears(b).values()]
    linears.append(reduction)
    total = sum(stored_bits(*m.weight.shape, weight_grid(m).spec) for m in linears)
    count = sum(m.weight.numel() for m in linears)
    assert method.weight_bits(model, adapter) == pytest.approx(total / count)
