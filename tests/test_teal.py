"""TEAL activation sparsity (channelwise.methods.teal): thresholds against a plain quantile
reference, the greedy allocation's target, the sparse-input kernels on decode, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_tiny_tokenizer
from helpers import count_calls, greedy_generate, logits, save_and_reload

from channelwise import quantize
from channelwise.adapters import adapter_for
from channelwise.deploy import pack_model
from channelwise.deploy import sparse as deploy_sparse
from channelwise.deploy.kernel_call import use_kernels
from channelwise.engine import capture_block_inputs, hidden_state
from channelwise.errors import RecipeError
from channelwise.methods.teal import (
    LINEARS,
    MAX_LEVEL,
    level_threshold,
    slice_batch,
    sorted_magnitudes,
)
from channelwise.recipe import Recipe

WIDE = dict(hidden_size=64, intermediate_size=128)


def teal_recipe(sparsity: float = 0.5, weights: dict | None = None, **args) -> Recipe:
    step = {"method": "teal", "args": {"sparsity": sparsity, **args}}
    spec = {"name": "teal-test", "steps": [step]}
    if weights is not None:
        spec |= {"weights": weights}
        spec["steps"].append({"method": "rtn"})
    return Recipe.from_dict(spec)


@pytest.fixture
def calibration() -> torch.Tensor:
    return torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(5))


def block_inputs(model, ids: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
    """The dense inputs of block ``index``'s 7 linears on ``ids`` (hooks of later blocks off)."""
    block, got, handles = model.model.layers[index], {}, []
    for name in LINEARS:
        handles.append(
            block.get_submodule(name).register_forward_pre_hook(
                lambda _m, args, name=name: got.setdefault(name, args[0].detach())
            )
        )
    logits(model, ids)
    for handle in handles:
        handle.remove()
    return got


def test_uniform_thresholds_are_the_magnitude_quantiles(make_tiny_model, calibration) -> None:
    dense = make_tiny_model("llama", **WIDE)
    inputs = block_inputs(dense, calibration, 0)
    model = make_tiny_model("llama", **WIDE)
    method = quantize(model, teal_recipe(0.4, allocation="uniform"), calibration,
                      progress=False).methods[0]  # fmt: skip
    for name, x in inputs.items():
        expected = torch.quantile(x.abs().flatten().double(), 0.4).item()
        assert method.thresholds[f"0.{name}"].item() == pytest.approx(expected, rel=0.02), name
        assert (x.abs() < method.thresholds[f"0.{name}"]).float().mean().item() == pytest.approx(
            0.4, abs=0.02
        )


def test_greedy_meets_the_parameter_weighted_target(make_tiny_model, calibration) -> None:
    model = make_tiny_model("llama", **WIDE)
    method = quantize(model, teal_recipe(0.5, step=0.05), calibration, progress=False).methods[0]
    block = model.model.layers[1]
    sizes = {name: block.get_submodule(name).weight.numel() for name in LINEARS}
    levels = {name: method.levels[f"1.{name}"] for name in LINEARS}
    mean = sum(sizes[n] * levels[n] for n in LINEARS) / sum(sizes.values())
    smallest_step = 0.05 * sizes["self_attn.q_proj"] / sum(sizes.values())
    assert abs(mean - 0.5) <= smallest_step / 2 + 1e-9
    assert all(0 <= level <= MAX_LEVEL for level in levels.values())
    assert len(set(levels.values())) > 1, "greedy allocates unequal levels"


def test_greedy_does_not_lose_to_uniform_on_the_sequences_it_scored(
    make_tiny_model, calibration
) -> None:
    """The greedy choice minimises block-output error step by step; at equal mean sparsity its
    logits should stay about as close to the dense ones as the uniform levels' (within 25%)."""

    def block_error(allocation: str) -> float:
        dense = make_tiny_model("llama", **WIDE)
        model = make_tiny_model("llama", **WIDE)
        quantize(model, teal_recipe(0.5, allocation=allocation, greedy_samples=2),
                 calibration, progress=False)  # fmt: skip
        return (logits(model, calibration[:2]) - logits(dense, calibration[:2])).pow(2).mean()

    assert block_error("greedy") < block_error("uniform") * 1.25


def test_sorted_magnitudes_and_level_thresholds() -> None:
    x = torch.tensor([[-3.0, 1.0], [0.5, -2.0]])
    magnitudes = sorted_magnitudes([x])
    assert torch.equal(magnitudes, torch.tensor([0.5, 1.0, 2.0, 3.0]))
    assert level_threshold(magnitudes, 0.0) == 0.0
    assert level_threshold(magnitudes, 0.5) == 2.0  # |x| < 2 zeroes half
    assert level_threshold(magnitudes, 1.0) == 3.0


@pytest.fixture
def sparse_input_calls(monkeypatch) -> list[int]:
    return count_calls(monkeypatch, deploy_sparse.kernels, "sparse_input_linear")


@pytest.mark.parametrize(
    "weights", [None, {"bits": 4, "symmetric": False, "granularity": "group", "group_size": 64}]
)
def test_decode_through_the_sparse_input_kernel_matches_the_dense_path(
    make_tiny_model, calibration, sparse_input_calls, weights
) -> None:
    model = make_tiny_model("llama", **WIDE)
    quantize(model, teal_recipe(0.5, weights, allocation="uniform"), calibration, progress=False)
    if weights is not None:
        assert pack_model(model)
    ids = calibration[:1, :5]

    def greedy():
        return greedy_generate(model, ids, 4)

    sparse_ids, sparse_scores = greedy()
    assert len(sparse_input_calls) == 3 * 2 * len(LINEARS), "3 decode steps, 2 blocks, 7 linears"
    before = use_kernels(False)
    try:
        dense_ids, dense_scores = greedy()
    finally:
        use_kernels(before)
    assert torch.equal(sparse_ids, dense_ids)
    torch.testing.assert_close(sparse_scores, dense_scores, rtol=1e-4, atol=1e-4)


def test_saved_thresholds_reload_to_identical_logits(
    make_tiny_model, calibration, tmp_path: Path
) -> None:
    model = make_tiny_model("llama", **WIDE)
    quantize(model, teal_recipe(0.5, allocation="uniform"), calibration, progress=False)
    expected = logits(model, calibration)
    loaded = save_and_reload(model, build_tiny_tokenizer(), tmp_path / "out")
    assert torch.equal(logits(loaded, calibration), expected)
    assert getattr(loaded.model.layers[0].mlp.down_proj, deploy_sparse.SPARSE_INPUT_ATTR)


@pytest.mark.parametrize("family", ["opt", "gpt2", "gpt_neox"])
def test_families_without_a_gated_mlp_are_refused(make_tiny_model, calibration, family) -> None:
    with pytest.raises(RecipeError, match="gated MLP"):
        quantize(make_tiny_model(family), teal_recipe(), calibration, progress=False)


@pytest.mark.parametrize(
    "args", [{"sparsity": 0.0}, {"sparsity": 1.0}, {"allocation": "random"}, {"step": 0.0}]
)
def test_bad_arguments_are_refused(make_tiny_model, calibration, args) -> None:
    spec = {"name": "t", "steps": [{"method": "teal", "args": {"sparsity": 0.5} | args}]}
    with pytest.raises(RecipeError):
        quantize(make_tiny_model("llama"), Recipe.from_dict(spec), calibration, progress=False)


def test_a_causal_block_on_its_first_tokens_equals_the_full_run(make_tiny_model) -> None:
    """The greedy search scores on the first tokens only, with the kwargs cut to match."""
    model = make_tiny_model("llama", **WIDE)
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(1))
    inputs, kwargs = capture_block_inputs(model, adapter_for(model), ids, 3)
    block = model.model.layers[0]
    with torch.no_grad():
        full = hidden_state(block(inputs[0], **kwargs[0]))
        part = hidden_state(block(inputs[0][:2, :9], **slice_batch(kwargs[0], (3, 40), (2, 9))))
    torch.testing.assert_close(part, full[:2, :9], rtol=1e-5, atol=1e-6)
