"""Qwen3, Gemma 2/3 and Phi-3: every preset works or is refused with its reason; what is
particular to each family (fused projections, (1 + w) norms, soft-capped logits) is exact."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import build_tiny_model
from helpers import logits, relative_error

from channelwise import quantize
from channelwise.adapters import adapter_for, norm_gain
from channelwise.adapters.mixtral import SplitExperts
from channelwise.adapters.phi3 import SplitLinear
from channelwise.compress import save_quantized
from channelwise.engine import run_blockwise
from channelwise.errors import UnsupportedModelError
from channelwise.quant.attention import use_channelwise_attention
from channelwise.recipe import preset_names
from channelwise.tiny import preset_trial
from channelwise.transforms import fold_scales_into_norm
from channelwise.transforms.rotate import fuse_norms, online_hadamard, rotate_residual
from channelwise.transforms.shift import shift_norm_output

NEW_FAMILIES = ("qwen3", "gemma2", "gemma3_text", "phi3", "mixtral")

QK_NORM = "q_norm/k_norm"
SANDWICH = "post-attention and post-feedforward RMSNorms"
LLAMA_ONLY = "Llama"
ROTATION_PRESETS = ("quarot-rtn-w4a4", "quarot-rtn-w6a6", "quarot-rtn-w8a8")
ROTATION_PRESETS += ("quarot-w4a4", "quarot-w6a6")
SHIFTING_METHODS = ("osplus", "outliertune")
SPARSITY_PRESETS = ("cats-50", "chess-50", "chess-50-w4a16-g64", "teal-50", "teal-50-w4a16-g64")


def expected_refusals(family: str) -> dict[str, str]:
    """Preset → a phrase its refusal must contain; every other preset must work."""
    refused = {
        "ias-vit-w4a4": "Vision Transformer",
        "ias-vit-w6a6": "Vision Transformer",
        "repquant-w4a4": "Vision Transformer",
        "repquant-w6a6": "Vision Transformer",
        "bivit": "Vision Transformer",
        "lpvit-50": "Vision Transformer",
        "lrp-qvit-w4a4": "Vision Transformer",
        "lrp-qvit-w6a6": "Vision Transformer",
        "repq-vit-w4a4": "has no bias",
        "repq-vit-w6a6": "has no bias",
    }
    key_side = QK_NORM if family in ("qwen3", "gemma3_text") else LLAMA_ONLY
    for preset in ("cskv-50", "cskv-50-kv4", "rotatekv-kv2", "rotatekv-kv4", "kv_bfp"):
        refused[preset] = key_side
    if family.startswith("gemma"):
        refused |= dict.fromkeys(ROTATION_PRESETS, SANDWICH)
    if family == "mixtral":
        shifting = [p for p in preset_names() if p.split("-")[0] in SHIFTING_METHODS]
        refused |= dict.fromkeys(shifting, "has no bias to absorb a shift")
        refused |= dict.fromkeys(SPARSITY_PRESETS, "no mlp.gate_proj")
    return refused


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_every_preset_works_or_is_refused_with_its_reason(family, tmp_path) -> None:
    refusals = expected_refusals(family)
    for preset in preset_names():
        trial = preset_trial(family, preset, tmp_path / preset)
        where = f"{family} × {preset}: {trial.reason}"
        assert trial.status != "failed", where
        if preset in refusals:
            assert trial.status == "refused" and refusals[preset] in trial.reason, where
            continue
        assert trial.status == "ok", where
        # Tiny random models at 3 bits lose much; a broken model loses everything (≈ 1.4).
        bound = 0.1 if "w8" in preset else 1.0
        assert trial.error is not None and 0 <= trial.error < bound, (where, trial.error)
        if preset == "fp":
            assert trial.error == 0
        assert trial.packed in (None, True), f"{where}: the packed reload differs"


@pytest.mark.parametrize("family", NEW_FAMILIES[:4])
def test_channelwise_attention_matches_eager(family, token_ids) -> None:
    """Gemma 2 soft-caps its attention logits; both Gemmas mix sliding-window layers."""
    model = build_tiny_model(family, attn_implementation="eager")
    before = logits(model, token_ids)
    use_channelwise_attention(model)
    assert model.config._attn_implementation == "channelwise"
    torch.testing.assert_close(logits(model, token_ids), before, rtol=0, atol=1e-5)


def test_gemma2_soft_capping_is_applied_by_the_channelwise_attention(token_ids) -> None:
    capped = build_tiny_model("gemma2", attn_logit_softcapping=0.01, attn_implementation="eager")
    uncapped = build_tiny_model("gemma2", attn_logit_softcapping=None)
    expected = logits(capped, token_ids)
    for model in (capped, uncapped):
        use_channelwise_attention(model)
    torch.testing.assert_close(logits(capped, token_ids), expected, rtol=0, atol=1e-5)
    assert relative_error(logits(uncapped, token_ids), expected) > 1e-3, "the cap must matter"


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_scales_fold_through_one_plus_weight_norms(family, token_ids) -> None:
    model = build_tiny_model(family)
    generator = torch.Generator().manual_seed(3)
    adapter = adapter_for(model)
    for block in adapter.block_list(model):
        for subset in adapter.subsets:
            if subset.prev_kind == "norm":
                norm = block.get_submodule(subset.prev)
                norm.weight.data.normal_(0, 0.5, generator=generator)
    before = logits(model, token_ids)
    for block in adapter.block_list(model):
        norm = block.input_layernorm
        s = torch.rand(norm.weight.numel(), generator=generator) * 4 + 0.25
        gain = norm_gain(norm).clone()
        attention = [block.get_submodule(n) for n in adapter.subsets[0].linears]
        fold_scales_into_norm(norm, attention, s, False)
        torch.testing.assert_close(norm_gain(norm), gain / s)
    assert relative_error(logits(model, token_ids), before) < 1e-5


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_norm_fusion_sets_a_gemma_gain_to_one(family, token_ids) -> None:
    model = build_tiny_model(family)
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.weight.data.uniform_(-0.5, 0.5)
    adapter = adapter_for(model)
    before = logits(model, token_ids)
    fuse_norms(model, adapter)
    assert torch.all(norm_gain(adapter.block_list(model)[0].input_layernorm) == 1)
    assert relative_error(logits(model, token_ids), before) < 1e-5


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_residual_rotation_is_refused_under_sandwich_norms(family) -> None:
    model = build_tiny_model(family)
    with pytest.raises(UnsupportedModelError, match="post-attention and post-feedforward"):
        quantize(model, "quarot-rtn-w8a8", progress=False)


def test_phi3_fused_projections_split_exactly_and_save_fused(token_ids, tmp_path) -> None:
    model = build_tiny_model("phi3")
    before = logits(model, token_ids)
    keys = set(model.state_dict())
    adapter = adapter_for(model)  # splits
    block = adapter.block_list(model)[0]
    assert isinstance(block.self_attn.qkv_proj, SplitLinear)
    assert [n for n, _ in block.mlp.gate_up_proj.named_children()] == ["gate_proj", "up_proj"]
    torch.testing.assert_close(logits(model, token_ids), before, rtol=0, atol=1e-6)
    assert set(model.state_dict()) == keys, "the float layout stays Phi-3's"
    adapter_for(model)  # idempotent
    assert isinstance(block.self_attn.qkv_proj.q_proj, torch.nn.Linear)

    quantize(model, "gptq-w4a16-g64", torch.randint(0, 128, (4, 16)), progress=False)
    expected = logits(model, token_ids)
    folder = save_quantized(model, None, tmp_path / "out")
    plain = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert isinstance(plain.model.layers[0].self_attn.qkv_proj, torch.nn.Linear)
    reloaded = logits(plain, token_ids)  # one fused GEMM: equal up to summation order
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=1e-5)


def test_split_linear_loads_a_fused_state_dict() -> None:
    fused = torch.nn.Linear(8, 6, bias=True)
    split = SplitLinear.of(fused, {"a": 2, "b": 4})
    x = torch.randn(3, 8)
    torch.testing.assert_close(split(x), fused(x), rtol=0, atol=1e-6)
    assert set(split.state_dict()) == {"weight", "bias"}
    other = SplitLinear.of(torch.nn.Linear(8, 6, bias=True), {"a": 2, "b": 4})
    other.load_state_dict(split.state_dict())
    assert torch.equal(other(x), split(x))
    with pytest.raises(ValueError, match="do not add up"):
        SplitLinear.of(fused, {"a": 2, "b": 3})


def phi3_from_llama(llama: torch.nn.Module) -> torch.nn.Module:
    """A tiny Phi-3 holding ``llama``'s weights, q/k/v and gate/up fused: the same function."""
    phi3 = build_tiny_model("phi3", rms_norm_eps=llama.config.rms_norm_eps)
    state = dict(llama.state_dict())
    for i in range(llama.config.num_hidden_layers):
        at, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        parts = [state.pop(f"{at}{p}_proj.weight") for p in "qkv"]
        state[f"{at}qkv_proj.weight"] = torch.cat(parts)
        parts = [state.pop(f"{mlp}{p}_proj.weight") for p in ("gate", "up")]
        state[f"{mlp}gate_up_proj.weight"] = torch.cat(parts)
    phi3.load_state_dict(state)
    return phi3


@pytest.mark.parametrize("preset", ["chess-50", "cats-50", "teal-50"])
def test_sparsity_on_phi3_is_sparsity_on_the_same_llama(preset, calibration_ids, token_ids):
    # Phi-3's fused projections are thresholded as their split parts: on a Phi-3 holding a
    # Llama's weights every threshold, and so every logit, is the Llama's.
    llama = build_tiny_model("llama")
    phi3 = phi3_from_llama(llama)
    torch.testing.assert_close(logits(phi3, token_ids), logits(llama, token_ids), atol=1e-5, rtol=0)
    results = [quantize(m, preset, calibration_ids, progress=False) for m in (llama, phi3)]
    states = [r.methods[0].saved_state() for r in results]
    assert sorted(states[0]) == sorted(states[1]) and states[0]
    for key, threshold in states[0].items():
        torch.testing.assert_close(states[1][key], threshold, atol=1e-5, rtol=1e-5)
    sparse = logits(phi3, token_ids)
    assert not torch.allclose(sparse, logits(phi3_from_llama(build_tiny_model("llama")), token_ids))
    torch.testing.assert_close(sparse, logits(llama, token_ids), atol=1e-4, rtol=0)
    down = phi3.model.layers[0].mlp.down_proj
    assert getattr(down, "_channelwise_sparse_input", False)


def test_mixtral_experts_split_exactly_and_save_fused(token_ids, tmp_path) -> None:
    model = build_tiny_model("mixtral")
    before = logits(model, token_ids)
    keys = set(model.state_dict())
    adapter = adapter_for(model)
    experts = adapter.block_list(model)[0].mlp.experts
    assert isinstance(experts, SplitExperts) and len(experts) == 4
    torch.testing.assert_close(logits(model, token_ids), before, rtol=0, atol=1e-6)
    assert set(model.state_dict()) == keys, "the float layout stays Mixtral's"
    quantize(model, "rtn-w4a16-g64", progress=False)
    expected = logits(model, token_ids)
    folder = save_quantized(model, None, tmp_path / "out")
    plain = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.testing.assert_close(logits(plain, token_ids), expected, rtol=0, atol=1e-5)


def avoid_expert(router: torch.nn.Module, expert: int) -> None:
    """Make ``router`` (Mixtral's top-k router) never pick ``expert``."""

    def forward(hidden: torch.Tensor):
        scores = torch.nn.functional.linear(hidden.reshape(-1, router.hidden_dim), router.weight)
        scores[:, expert] = float("-inf")
        top, index = torch.topk(torch.softmax(scores.float(), dim=-1), router.top_k, dim=-1)
        return scores, top / top.sum(dim=-1, keepdim=True), index

    router.forward = forward


def test_every_expert_is_calibrated_on_every_token(calibration_ids) -> None:
    """An expert the router never picks still gets a Hessian from all calibration tokens;
    the block's outputs keep following the router."""
    model = build_tiny_model("mixtral")
    adapter = adapter_for(model)
    for layer in adapter.block_list(model):
        avoid_expert(layer.mlp.gate, 3)
    expert = adapter.block_list(model)[0].mlp.experts[3]
    seen: list[int] = []
    handle = expert.gate_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[0]))
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(5))
    before = logits(model, ids)
    assert seen == [], "the router never picks expert 3 outside calibration"
    outputs = run_blockwise(model, adapter, ids, lambda ctx: None, batch_size=4, progress=False)
    assert seen and all(n == 4 * 16 for n in seen), "every token reaches expert 3"
    handle.remove()
    with torch.no_grad():
        hidden = model.model.norm(outputs[0])
        torch.testing.assert_close(model.lm_head(hidden), before, rtol=0, atol=1e-5)
    original = expert.down_proj.weight.detach().clone()
    quantize(model, "gptq-w4a16-g64", calibration_ids, progress=False)
    assert not torch.equal(expert.down_proj.weight, original), "GPTQ quantized expert 3 too"
    assert torch.isfinite(logits(model, ids)).all()


def mixtral_with_folds(declare_router: bool = True) -> tuple[torch.nn.Module, object]:
    model = build_tiny_model("mixtral")
    adapter = adapter_for(model)
    if not declare_router:  # the negative control: the router left out of every fold
        for layer in adapter.block_list(model):
            delattr(layer.post_attention_layernorm, "_channelwise_column_readers")
    return model, adapter


@pytest.mark.parametrize("declare_router", [True, False])
def test_mixtral_folds_and_rotations_reach_the_router(token_ids, declare_router) -> None:
    """Scales folded into the post-attention norm, fused norm gains and a residual rotation
    leave the logits as they were because the router's columns take them too; left out, the
    routing changes."""
    model, adapter = mixtral_with_folds(declare_router)
    before = logits(model, token_ids)
    generator = torch.Generator().manual_seed(3)
    for layer in adapter.block_list(model):
        norm = layer.post_attention_layernorm
        experts = [layer.get_submodule(n) for n in adapter.subsets[2].linears]
        fold_scales_into_norm(norm, experts, torch.rand(64, generator=generator) + 0.5, False)
    folded = relative_error(logits(model, token_ids), before)
    fuse_norms(model, adapter)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=generator, dtype=torch.float64))
    rotate_residual(model, adapter, q)
    rotated = relative_error(logits(model, token_ids), before)
    if declare_router:
        assert folded < 1e-5 and rotated < 1e-5, (folded, rotated)
    else:
        assert folded > 1e-3 and rotated > 1e-3, (folded, rotated)


def test_mixtral_refuses_shifting_the_norm_the_router_reads() -> None:
    model, adapter = mixtral_with_folds()
    layer = adapter.block_list(model)[0]
    experts = [layer.get_submodule(n) for n in adapter.subsets[2].linears]
    with pytest.raises(UnsupportedModelError, match="no bias to absorb the shift"):
        shift_norm_output(layer.post_attention_layernorm, experts, torch.ones(64), False)


def test_quarot_on_mixtral_rotates_every_expert_down_proj_input(calibration_ids) -> None:
    model = build_tiny_model("mixtral")
    quantize(model, "quarot-rtn-w4a4", calibration_ids, progress=False)
    for layer in adapter_for(model).block_list(model):
        assert all(online_hadamard(expert.down_proj) is not None for expert in layer.mlp.experts)
        assert online_hadamard(layer.self_attn.o_proj) is not None
