"""CHESS and CATS activation sparsity (channelwise.methods.chess): thresholds against a plain
reference, the sparsity they reach, hooks, save/load, composition with weight quantization."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_tiny_tokenizer
from helpers import count_calls, greedy_generate, logits, save_and_reload

from channelwise import quantize
from channelwise.deploy import pack_model
from channelwise.deploy.sparse import (
    SPARSITY_HOOK_ATTR,
    SPARSITY_THRESHOLD_ATTR,
    install_threshold_hook,
    remove_threshold_hook,
)
from channelwise.errors import ChannelwiseError, RecipeError
from channelwise.methods.chess import ACT, ATTENTION_INPUTS, GATE, UP
from channelwise.recipe import Recipe

WIDE = dict(hidden_size=64, intermediate_size=128)


def sparsity_recipe(method: str, sparsity: float = 0.5, **args) -> Recipe:
    return Recipe.from_dict(
        {
            "name": f"{method}-test",
            "steps": [{"method": method, "args": {"sparsity": sparsity, **args}}],
        }
    )


@pytest.fixture
def calibration() -> torch.Tensor:
    return torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(11))


def mlp_activations(model, ids: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block ``index``'s ``act(gate(x))`` and ``up(x)`` on ``ids`` (dense: hooks off)."""
    block = model.model.layers[index]
    got = {}
    handle = block.mlp.gate_proj.register_forward_pre_hook(
        lambda _m, args: got.setdefault("x", args[0].detach())
    )
    with torch.no_grad():
        model(ids, use_cache=False)
        handle.remove()
        x = got["x"]
        return block.mlp.act_fn(block.mlp.gate_proj(x)), block.mlp.up_proj(x)


def reference_chess_threshold(act: torch.Tensor, up: torch.Tensor, p: float) -> torch.Tensor:
    """The paper's per-channel thresholds, one sequence at a time."""
    mean_up = up.abs().mean(dim=(0, 1))
    taus = [torch.quantile((a.abs() * mean_up).flatten(), p) for a in act]
    return torch.stack(taus).mean() / mean_up


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_chess_thresholds_match_the_reference_and_reach_the_target(
    make_tiny_model, calibration, family
) -> None:
    dense = make_tiny_model(family, **WIDE)
    act0, up0 = mlp_activations(dense, calibration, 0)
    model = make_tiny_model(family, **WIDE)
    result = quantize(model, sparsity_recipe("chess", 0.5, attention=False), calibration,
                      progress=False)  # fmt: skip
    method = result.methods[0]
    expected = reference_chess_threshold(act0, up0, 0.5)
    assert torch.allclose(method.thresholds[f"0.{ACT}"], expected, rtol=1e-5, atol=1e-7)
    zeroed = (act0.abs() < expected).float().mean().item()
    assert zeroed == pytest.approx(0.5, abs=0.03)


def test_cats_threshold_is_the_layer_quantile(make_tiny_model, calibration) -> None:
    dense = make_tiny_model("llama", **WIDE)
    act0, _ = mlp_activations(dense, calibration, 0)
    model = make_tiny_model("llama", **WIDE)
    method = quantize(model, sparsity_recipe("cats", 0.7), calibration, progress=False).methods[0]
    expected = torch.stack([torch.quantile(a.abs().flatten(), 0.7) for a in act0]).mean()
    assert method.thresholds[f"0.{ACT}"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert (act0.abs() < expected).float().mean().item() == pytest.approx(0.7, abs=0.03)


def test_hooks_zero_the_small_activations_and_only_those(make_tiny_model, calibration) -> None:
    model = make_tiny_model("llama", **WIDE)
    method = quantize(model, sparsity_recipe("chess", 0.5), calibration, progress=False).methods[0]
    block = model.model.layers[1]
    seen = {}
    block.mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen.setdefault("h", a[0]))
    block.mlp.act_fn.register_forward_hook(lambda _m, _a, out: seen.setdefault("act", out))
    block.self_attn.q_proj.register_forward_pre_hook(lambda _m, a: seen.setdefault("q", a[0]))
    block.self_attn.k_proj.register_forward_pre_hook(lambda _m, a: seen.setdefault("k", a[0]))
    logits(model, calibration[:2])
    act = seen["act"]
    assert (act == 0).float().mean().item() == pytest.approx(0.5, abs=0.1)
    nonzero = act[act != 0].abs()
    threshold = method.thresholds[f"1.{ACT}"].expand_as(act)[act != 0]
    assert (nonzero >= threshold).all()
    assert ((seen["h"] == 0) >= (act == 0)).all(), "a zeroed activation zeroes its product"
    q_threshold = method.thresholds[f"1.{ATTENTION_INPUTS[0]}"]
    assert (seen["q"][seen["q"] != 0].abs() >= q_threshold).all()
    assert (seen["k"] == 0).float().mean() < 0.05, "k_proj reads the dense input"


def test_threshold_hook_reads_its_threshold_in_place_and_goes_away_whole() -> None:
    linear = torch.nn.Linear(8, 4)
    x = torch.linspace(-1, 1, 16).reshape(2, 8)
    threshold = torch.tensor(0.5)
    install_threshold_hook(linear, threshold, on_output=False)
    assert torch.equal(
        linear(x),
        torch.nn.functional.linear(x.masked_fill(x.abs() < 0.5, 0), linear.weight, linear.bias),
    )
    threshold.fill_(2.0)  # read at every call
    assert torch.equal(linear(x), linear.bias.expand(2, 4))
    install_threshold_hook(linear, torch.tensor(0.0), on_output=False)  # replaces, never stacks
    assert len(linear._forward_pre_hooks) == 1
    assert torch.equal(linear(x), torch.nn.functional.linear(x, linear.weight, linear.bias))
    remove_threshold_hook(linear)
    assert not linear._forward_pre_hooks and not hasattr(linear, SPARSITY_HOOK_ATTR)
    assert not hasattr(linear, SPARSITY_THRESHOLD_ATTR)


def test_low_sparsity_barely_changes_the_model(make_tiny_model, calibration) -> None:
    dense = make_tiny_model("llama", **WIDE)
    expected = logits(dense, calibration)
    near = make_tiny_model("llama", **WIDE)
    quantize(near, sparsity_recipe("chess", 0.02), calibration, progress=False)
    far = make_tiny_model("llama", **WIDE)
    quantize(far, sparsity_recipe("chess", 0.7), calibration, progress=False)
    error = (logits(near, calibration) - expected).norm() / expected.norm()
    assert 0 < error < 0.05
    assert (logits(far, calibration) - expected).norm() / expected.norm() > error


@pytest.mark.parametrize("method", ["chess", "cats"])
def test_saved_thresholds_reload_to_identical_logits(
    make_tiny_model, calibration, tmp_path: Path, method
) -> None:
    model = make_tiny_model("llama", **WIDE)
    quantize(model, sparsity_recipe(method, 0.5), calibration, progress=False)
    expected = logits(model, calibration)
    loaded = save_and_reload(model, build_tiny_tokenizer(), tmp_path / "out")
    assert torch.equal(logits(loaded, calibration), expected)


def test_composes_with_packed_int4_weights(make_tiny_model, calibration, tmp_path: Path) -> None:
    model = make_tiny_model("llama", **WIDE)
    recipe = Recipe.from_dict(
        {
            "name": "chess-w4",
            "weights": {"bits": 4, "symmetric": False, "granularity": "group", "group_size": 64},
            "steps": [{"method": "chess", "args": {"sparsity": 0.5}}, {"method": "rtn"}],
        }
    )
    quantize(model, recipe, calibration, progress=False)
    fake = logits(model, calibration)
    assert pack_model(model)
    loaded = save_and_reload(model, build_tiny_tokenizer(), tmp_path / "out")
    assert torch.allclose(logits(loaded, calibration), fake, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["opt", "gpt2", "gpt_neox"])
def test_families_without_a_gated_mlp_are_refused(make_tiny_model, calibration, family) -> None:
    model = make_tiny_model(family)
    with pytest.raises(RecipeError, match="gated MLP"):
        quantize(model, sparsity_recipe("chess"), calibration, progress=False)


@pytest.mark.parametrize("sparsity", [0.0, 1.0, -0.1, 1.5])
def test_sparsity_outside_zero_one_is_refused(make_tiny_model, calibration, sparsity) -> None:
    with pytest.raises(RecipeError, match="sparsity"):
        quantize(make_tiny_model("llama"), sparsity_recipe("cats", sparsity), calibration)


def test_nan_activations_are_named(make_tiny_model, calibration) -> None:
    model = make_tiny_model("llama", **WIDE)
    quantize(model, sparsity_recipe("cats", 0.5), calibration, progress=False)
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[0, 0] = float("nan")
    with pytest.raises(ChannelwiseError, match="NaN or inf"):
        logits(model, calibration[:1])


def test_names_used_by_the_hooks_exist_in_the_llama_family(make_tiny_model) -> None:
    block = make_tiny_model("llama").model.layers[0]
    for name in (GATE, UP, ACT, *ATTENTION_INPUTS):
        assert block.get_submodule(name) is not None


def test_cats_takes_no_attention_option(make_tiny_model, calibration) -> None:
    with pytest.raises(RecipeError, match="attention"):
        quantize(
            make_tiny_model("llama"), sparsity_recipe("cats", 0.5, attention=True), calibration
        )


def test_long_rows_are_subsampled_close_to_the_full_quantile() -> None:
    from channelwise.methods.chess import QUANTILE_SAMPLE, sequence_quantile

    values = torch.randn(3, 4 * QUANTILE_SAMPLE + 7, generator=torch.Generator().manual_seed(2))
    full = torch.quantile(values, 0.7, dim=1).mean()
    assert sequence_quantile(values, 0.7).item() == pytest.approx(full.item(), abs=0.01)


# ----------------------------------------------------------------------------- sparse decode
WEIGHTS = {
    "fp32": None,
    "w8": {"bits": 8, "symmetric": True, "granularity": "channel"},
    "w4": {"bits": 4, "symmetric": False, "granularity": "group", "group_size": 64},
}


def sparse_model(make_tiny_model, calibration, weights: str, activations: dict | None = None):
    """A tiny Llama with CHESS 50% (and, for W8/W4, RTN weights, packed)."""
    model = make_tiny_model("llama", **WIDE)
    spec = {"name": f"chess-{weights}", "steps": [{"method": "chess", "args": {"sparsity": 0.5}}]}
    if WEIGHTS[weights] is not None:
        spec |= {"weights": WEIGHTS[weights]}
        spec["steps"].append({"method": "rtn"})
    if activations is not None:
        spec["activations"] = activations
    quantize(model, Recipe.from_dict(spec), calibration, progress=False)
    if WEIGHTS[weights] is not None:
        assert pack_model(model)
    return model


@pytest.fixture
def sparse_calls(monkeypatch) -> list[int]:
    """How many times the fused sparse MLP op ran (one entry per call: its token count)."""
    from channelwise.deploy import sparse as deploy_sparse

    return count_calls(monkeypatch, deploy_sparse.kernels, "sparse_mlp")


@pytest.mark.parametrize("weights", list(WEIGHTS))
def test_sparse_decode_equals_the_dense_mlp(make_tiny_model, calibration, sparse_calls, weights):
    from channelwise.deploy.kernel_call import use_kernels
    from channelwise.deploy.sparse import SPARSE_MAX_TOKENS, SparseGatedMLP

    model = sparse_model(make_tiny_model, calibration, weights)
    mlp = model.model.layers[1].mlp
    assert isinstance(mlp, SparseGatedMLP)
    for shape in [(1, 1), (1, 3), (2, 2), (1, SPARSE_MAX_TOKENS + 1)]:
        x = torch.randn(*shape, 64, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            sparse = mlp(x)
            before = use_kernels(False)
            try:
                dense = mlp(x)
            finally:
                use_kernels(before)
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    assert sparse_calls == [1, 3, 4], "up to SPARSE_MAX_TOKENS tokens take the sparse op"


def test_sparse_generation_matches_the_dense_path(make_tiny_model, calibration, sparse_calls):
    from channelwise.deploy.kernel_call import use_kernels

    model = sparse_model(make_tiny_model, calibration, "w4")
    ids = calibration[:1, :5]

    def greedy():
        return greedy_generate(model, ids, 6)

    sparse_ids, sparse_scores = greedy()
    assert len(sparse_calls) == 5 * 2, "5 single-token decode steps through 2 blocks"
    before = use_kernels(False)
    try:
        dense_ids, dense_scores = greedy()
    finally:
        use_kernels(before)
    assert torch.equal(sparse_ids, dense_ids)
    torch.testing.assert_close(sparse_scores, dense_scores, rtol=1e-4, atol=1e-4)


def test_an_mlp_linear_with_a_forward_hook_takes_the_dense_path(
    make_tiny_model, calibration, sparse_calls
):
    """An input quantizer on up/down (here W8A8's) must run: the sparse op would skip it."""
    activations = {"bits": 8, "symmetric": True, "granularity": "token", "dynamic": True}
    model = sparse_model(make_tiny_model, calibration, "w8", activations)
    with torch.no_grad():
        model.model.layers[0].mlp(torch.randn(1, 1, 64))
    assert sparse_calls == []


def test_the_sparse_mlp_keeps_the_state_dict_keys(make_tiny_model, calibration) -> None:
    dense_keys = list(make_tiny_model("llama", **WIDE).state_dict())
    model = make_tiny_model("llama", **WIDE)
    quantize(model, sparsity_recipe("cats", 0.5), calibration, progress=False)
    assert list(model.state_dict()) == dense_keys


@pytest.mark.parametrize("weights", list(WEIGHTS))
def test_attention_inputs_take_the_sparse_input_kernel(
    make_tiny_model, calibration, monkeypatch, weights
):
    from channelwise.deploy import sparse as deploy_sparse
    from channelwise.deploy.kernel_call import use_kernels

    calls = count_calls(monkeypatch, deploy_sparse.kernels, "sparse_input_linear")
    model = sparse_model(make_tiny_model, calibration, weights)
    attention = model.model.layers[0].self_attn
    if weights == "fp32":
        assert isinstance(attention.q_proj, deploy_sparse.SparseInputLinear)
    assert not getattr(attention.k_proj, deploy_sparse.SPARSE_INPUT_ATTR, False)
    x = torch.randn(1, 2, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        sparse = [attention.q_proj(x), attention.o_proj(x)]
        before = use_kernels(False)
        try:
            dense = [attention.q_proj(x), attention.o_proj(x)]
        finally:
            use_kernels(before)
    assert calls == [2, 2]
    for got, expected in zip(sparse, dense, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (dense[0] != 0).any()
