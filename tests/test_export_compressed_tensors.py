"""Export to compressed-tensors (the format vLLM loads), checked with the package itself.

Weights decompressed by compressed-tensors must equal the packed model's dequantized weights
exactly (scales are stored float32, so the tolerance is 0.0).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model, build_tiny_tokenizer
from helpers import logits

pytest.importorskip(
    "compressed_tensors",
    reason="compressed-tensors is not installed (pip install compressed-tensors==0.20.0)",
)

from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

from channelwise import quantize  # noqa: E402
from channelwise.deploy import PackedLinear, pack_model  # noqa: E402
from channelwise.deploy.compressed_tensors import (  # noqa: E402
    export_compressed_tensors,
    verify_compressed_tensors,
)
from channelwise.errors import ExportError, OutputExistsError  # noqa: E402
from channelwise.recipe import Recipe  # noqa: E402

WIDE = dict(hidden_size=128, intermediate_size=256)  # every preset's group sizes fit


@pytest.fixture(autouse=True)
def _reference_path():
    """Our packed modules dequantize + float GEMM here, as the decompressed export does."""
    from channelwise.deploy.packed import use_kernels

    before = use_kernels(False)
    yield
    use_kernels(before)


def packed(family: str, recipe, calibration_ids: torch.Tensor, **overrides):
    model = build_tiny_model(family, **(WIDE if family == "llama" else {}), **overrides)
    quantize(model, recipe, calibration_ids, progress=False)
    pack_model(model)
    return model


def rtn(name: str, weights: dict, activations: dict | None = None) -> Recipe:
    data = {"name": name, "weights": weights, "steps": [{"method": "rtn"}]}
    if activations is not None:
        data["activations"] = activations
    return Recipe.from_dict(data)


def parsed_config(folder) -> QuantizationConfig:
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    fields = set(QuantizationConfig.model_fields)
    return QuantizationConfig.model_validate({k: v for k, v in config.items() if k in fields})


def packed_modules(model) -> dict[str, PackedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


SYM_W4_G64 = rtn(
    "sym-w4-g64", {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 64}
)
ASYM_W8 = rtn("asym-w8", {"bits": 8, "symmetric": False, "granularity": "channel"})
W8A8_STATIC_ASYM = rtn(
    "w8a8-static-asym",
    {"bits": 8, "symmetric": True, "granularity": "channel"},
    {"bits": 8, "symmetric": False, "granularity": "tensor", "dynamic": False},
)
W8_TENSOR_A8 = rtn(
    "w8-tensor-a8",
    {"bits": 8, "symmetric": True, "granularity": "tensor"},
    {"bits": 8, "symmetric": True, "granularity": "token", "dynamic": True},
)

# (recipe, (format, weight strategy, input strategy or None))
MAPS = [
    ("rtn-w4a16-g64", ("pack-quantized", "group", None)),
    ("gptq-w4a16-g64", ("pack-quantized", "group", None)),
    ("awq-w4a16-g64", ("pack-quantized", "group", None)),
    ("rtn-w8a16", ("pack-quantized", "channel", None)),
    ("rtn-w8a8", ("int-quantized", "channel", "token")),
    ("smoothquant-w8a8", ("int-quantized", "channel", "token")),
    ("dgq-w4a8", ("int-quantized", "channel", "tensor")),  # static per-tensor inputs
    (SYM_W4_G64, ("pack-quantized", "group", None)),
    (ASYM_W8, ("pack-quantized", "channel", None)),
    (W8A8_STATIC_ASYM, ("int-quantized", "channel", "tensor")),
    (W8_TENSOR_A8, ("int-quantized", "tensor", "token")),
]


def _id(recipe) -> str:
    return getattr(recipe, "name", recipe)


@pytest.mark.parametrize(("recipe", "expected"), MAPS, ids=[_id(r) for r, _ in MAPS])
def test_export_decompresses_to_our_weights_exactly(recipe, expected, calibration_ids, tmp_path):
    model = packed("llama", recipe, calibration_ids)
    folder = export_compressed_tensors(model, build_tiny_tokenizer(), tmp_path / "ct")
    assert verify_compressed_tensors(folder, model) == 0.0
    fmt, weight_strategy, input_strategy = expected
    qconfig = parsed_config(folder)
    assert qconfig.format == fmt and qconfig.quantization_status == "compressed"
    (scheme,) = qconfig.config_groups.values()
    spec = next(iter(packed_modules(model).values())).spec
    assert scheme.weights.num_bits == spec.bits and scheme.weights.symmetric == spec.symmetric
    assert scheme.weights.strategy == weight_strategy
    assert (scheme.input_activations and scheme.input_activations.strategy) == input_strategy
    assert qconfig.ignore == ["lm_head"]
    assert (folder / "tokenizer.json").is_file()


@pytest.mark.parametrize("family", ["qwen2", "opt", "gpt_neox", "mistral"])
@pytest.mark.parametrize("preset", ["gptq-w4a16-g64", "rtn-w8a8"])
def test_other_families_export_exactly(family, preset, calibration_ids, tmp_path):
    model = packed(family, preset, calibration_ids)
    folder = export_compressed_tensors(model, build_tiny_tokenizer(), tmp_path / "ct")
    assert verify_compressed_tensors(folder, model) == 0.0
    parsed_config(folder)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
@pytest.mark.parametrize("tied", [False, True])
def test_transformers_loads_the_export_through_compressed_tensors(
    tied, calibration_ids, token_ids, tmp_path
):
    """The Hugging Face path (compressed-tensors' ModelCompressor decompressing on load) gives
    the packed model's logits exactly, and every non-quantized tensor as it was; a tied
    embedding is stored once."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = packed("llama", "rtn-w4a16-g64", calibration_ids, tie_word_embeddings=tied)
    folder = export_compressed_tensors(model, build_tiny_tokenizer(), tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    assert torch.equal(logits(loaded, token_ids), logits(model, token_ids))
    ours = model.state_dict()
    for key, tensor in loaded.state_dict().items():
        if ".layers." in key and "norm" not in key:
            continue
        assert torch.equal(tensor, ours[key]), key
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) is not tied


def test_extreme_codes_and_zero_points_round_trip(calibration_ids, tmp_path):
    model = packed("llama", "rtn-w4a16-g64", calibration_ids)
    generator = torch.Generator().manual_seed(3)
    modules = list(packed_modules(model).values())
    modules[0].qweight.fill_(0x00)  # every code at 0
    modules[1].qweight.fill_(0xFF)  # every code at 15
    modules[2].zero.fill_(0)
    modules[3].zero.fill_(15)
    modules[4].qweight.copy_(torch.randint(0, 256, modules[4].qweight.shape, generator=generator))
    modules[5].scale.copy_(torch.rand(modules[5].scale.shape, generator=generator) * 1e-6 + 1e-9)
    folder = export_compressed_tensors(model, None, tmp_path / "ct")
    assert verify_compressed_tensors(folder, model) == 0.0


def test_extreme_symmetric_int8_codes_round_trip(calibration_ids, tmp_path):
    model = packed("llama", "rtn-w8a8", calibration_ids)
    modules = list(packed_modules(model).values())
    modules[0].qweight.fill_(0)  # code −128
    modules[1].qweight.fill_(255)  # code 127
    folder = export_compressed_tensors(model, None, tmp_path / "ct")
    assert verify_compressed_tensors(folder, model) == 0.0


def test_export_leaves_the_model_unchanged(calibration_ids, token_ids, tmp_path):
    model = packed("llama", "rtn-w8a8", calibration_ids)
    expected = logits(model, token_ids)
    export_compressed_tensors(model, None, tmp_path / "ct")
    assert len(packed_modules(model)) == 14
    assert torch.equal(logits(model, token_ids), expected)


def test_verify_detects_a_different_model(calibration_ids, tmp_path):
    model = packed("llama", "rtn-w4a16-g64", calibration_ids)
    folder = export_compressed_tensors(model, None, tmp_path / "ct")
    next(iter(packed_modules(model).values())).scale.mul_(2)
    assert verify_compressed_tensors(folder, model) > 0


def test_existing_output_is_kept_without_force(calibration_ids, tmp_path):
    model = packed("llama", "rtn-w4a16-g64", calibration_ids)
    out = tmp_path / "ct"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        export_compressed_tensors(model, None, out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(OutputExistsError, match="--force replaces only"):  # not ours to delete
        export_compressed_tensors(model, None, out, force=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    export_compressed_tensors(model, None, out, force=True)  # an empty folder is filled
    (out / "stale.txt").write_text("old")
    export_compressed_tensors(model, None, out, force=True)  # our own export is replaced
    assert not (out / "stale.txt").exists() and verify_compressed_tensors(out, model) == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]  # no temporary left behind


REFUSALS = [
    ("quarot-rtn-w8a8", "online"),
    ("osplus-w8a8", "online"),
    ("outliertune-w8a8", "online"),
    ("rtn-w4a4", "4-bit input"),
    ("rtn-w6a6", "6-bit"),
    ("rtn-w3a16-g64", "3-bit weights"),
    ("adadim-w4a16-g64", "per input channel"),
    ("rtn-w4a8-g64", "W8A8"),
    (rtn("w8-tensor", {"bits": 8, "symmetric": True, "granularity": "tensor"}), "per tensor"),
    (
        rtn(
            "w8a8-input-channel",
            {"bits": 8, "symmetric": True, "granularity": "channel"},
            {"bits": 8, "symmetric": True, "granularity": "input_channel", "dynamic": False},
        ),
        "static PerColumn",
    ),
    (
        rtn(
            "w8a8-clipped",
            {"bits": 8, "symmetric": True, "granularity": "channel"},
            {
                "bits": 8,
                "symmetric": True,
                "granularity": "token",
                "dynamic": True,
                "clip_ratio": 0.9,
            },
        ),
        "min-max",
    ),
]


@pytest.mark.parametrize(("recipe", "message"), REFUSALS, ids=[_id(r) for r, _ in REFUSALS])
def test_what_the_format_cannot_express_is_refused_before_writing(
    recipe, message, calibration_ids, tmp_path
):
    model = packed("llama", recipe, calibration_ids)
    with pytest.raises(ExportError, match=message):
        export_compressed_tensors(model, build_tiny_tokenizer(), tmp_path / "ct")
    assert list(tmp_path.iterdir()) == []


def test_attention_and_embedding_quantization_are_refused(calibration_ids, tmp_path):
    from channelwise.compress import RECIPE_ATTR

    kv = {"bits": 8, "symmetric": True, "granularity": "token", "dynamic": True}
    recipe = Recipe.from_dict(
        {
            "name": "w8-kv8",
            "weights": {"bits": 8, "symmetric": True, "granularity": "channel"},
            "attention": {"k": kv, "v": kv},
            "steps": [{"method": "rtn"}],
        }
    )
    model = packed("llama", recipe, calibration_ids)
    with pytest.raises(ExportError, match="KV-cache"):
        export_compressed_tensors(model, None, tmp_path / "ct")
    model = packed("llama", "rtn-w8a16", calibration_ids)
    recipe = getattr(model, RECIPE_ATTR)
    setattr(model, RECIPE_ATTR, recipe.model_copy(update={"embedding": recipe.weights}))
    with pytest.raises(ExportError, match="embedding"):
        export_compressed_tensors(model, None, tmp_path / "ct")
    assert list(tmp_path.iterdir()) == []


def test_gpt2_conv1d_is_refused(calibration_ids, tmp_path):
    model = packed("gpt2", "rtn-w8a16", calibration_ids)
    with pytest.raises(ExportError, match="Conv1D"):
        export_compressed_tensors(model, None, tmp_path / "ct")
    assert list(tmp_path.iterdir()) == []


def test_an_online_hook_on_a_packed_linear_is_refused(calibration_ids, tmp_path):
    model = packed("llama", "rtn-w4a16-g64", calibration_ids)
    model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: a)
    with pytest.raises(ExportError, match=r"layers\.1\.mlp\.down_proj.*hook"):
        export_compressed_tensors(model, None, tmp_path / "ct")
    assert list(tmp_path.iterdir()) == []


def test_unpacked_and_uncompressed_models_are_refused(calibration_ids, tmp_path):
    model = build_tiny_model("llama", **WIDE)
    with pytest.raises(ExportError, match="not compressed"):
        export_compressed_tensors(model, None, tmp_path / "ct")
    quantize(model, "rtn-w4a16-g64", calibration_ids, progress=False)
    with pytest.raises(ExportError, match="pack_model"):
        export_compressed_tensors(model, None, tmp_path / "ct")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("recipe", ["rtn-w4a16-g64", ASYM_W8, "rtn-w8a16"], ids=_id)
def test_load_model_reads_a_weight_only_export_exactly(
    recipe, calibration_ids, token_ids, tmp_path
):
    """``channelwise.load_model`` (what ``channelwise eval DIR`` runs) reads a weight-only
    export, asymmetric included (transformers' compressed route stops on its packed zero
    points), to the packed model's logits exactly."""
    from channelwise import load_model

    model = packed("llama", recipe, calibration_ids)
    folder = export_compressed_tensors(model, build_tiny_tokenizer(), tmp_path / "ct")
    loaded, _ = load_model(folder, device="cpu")
    assert torch.equal(logits(loaded, token_ids), logits(model, token_ids))


def test_load_model_keeps_the_exports_int8_input_quantizers(calibration_ids, token_ids, tmp_path):
    """A W8A8 export loads with the package's own input quantizers: each linear computes
    ``W · x̂`` with our weights and x̂ on compressed-tensors' symmetric per-token grid (scale
    ``absmax / 127.5``, its convention; ours and vLLM's int8 kernel use ``absmax / 127``)."""
    from channelwise import load_model

    model = packed("llama", "rtn-w8a8", calibration_ids)
    folder = export_compressed_tensors(model, build_tiny_tokenizer(), tmp_path / "ct")
    loaded, _ = load_model(folder, device="cpu")
    quantized = logits(loaded, token_ids)  # the first forward decompresses the weights
    for name, ours in packed_modules(model).items():
        theirs = loaded.get_submodule(name)
        assert torch.equal(theirs.weight, ours.dequantized()), name
    linear = loaded.get_submodule("model.layers.0.mlp.down_proj")
    x = torch.randn(3, 5, linear.in_features, generator=torch.Generator().manual_seed(4))
    x[0, 0, :7] = 40.0  # an outlier token
    scale = x.abs().amax(-1, keepdim=True) / 127.5
    grid = (x / scale).round().clamp(-128, 127) * scale
    with torch.no_grad():
        torch.testing.assert_close(linear(x), grid @ linear.weight.T, rtol=1e-5, atol=1e-5)
    for module in loaded.modules():
        module.quantization_enabled = False
    assert not torch.equal(logits(loaded, token_ids), quantized)
