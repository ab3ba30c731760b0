"""Specification of the channel-scaling transforms: exact in float on every family."""

import math

import pytest
import torch
from helpers import logits
from torch import nn

from channelwise.adapters import adapter_for, linear_weight
from channelwise.errors import ChannelwiseError, RecipeError, UnsupportedModelError
from channelwise.transforms import (
    expand_to_query_heads,
    fold_scales_between_linears,
    fold_scales_grouped_heads,
    fold_scales_into_norm,
    reduce_to_kv_heads,
    smooth_scales,
    weight_input_absmax,
)

LLAMA_LIKE = ("llama", "qwen2", "mistral")


def random_scales(n: int, seed: int) -> torch.Tensor:
    """Log-uniform positive factors over [0.1, 10]."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    return torch.exp(math.log(0.1) + u * (math.log(10.0) - math.log(0.1)))


def randomize_vectors(model: nn.Module) -> None:
    """Perturb every 1-D parameter (norm γ/β, biases), so the folds of biases are exercised."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))


def assert_same_function(after: torch.Tensor, before: torch.Tensor, rel: float = 1e-5) -> None:
    error = ((after - before).abs().max() / before.abs().max()).item()
    assert error < rel, f"logits moved by {error:.2e} (relative to max |logit|)"


def attention_shape(model: nn.Module) -> tuple[int, int]:
    """``(n_rep, head_dim)`` of a Llama-family model."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads // config.num_key_value_heads, head_dim


def fold_kind(model: nn.Module, kind: str, seed: int = 0) -> int:
    """Fold random scales into every subset of ``kind`` in every block; returns how many."""
    adapter = adapter_for(model)
    transposed = adapter.transposed_weights
    done = 0
    for index, block in enumerate(adapter.block_list(model)):
        for number, subset in enumerate(adapter.subsets):
            if subset.prev_kind != kind:
                continue
            prev = block.get_submodule(subset.prev)
            linears = [block.get_submodule(name) for name in subset.linears]
            seed_here = seed + 100 * index + number
            if kind == "norm":
                s = random_scales(prev.weight.numel(), seed_here)
                fold_scales_into_norm(prev, linears, s, transposed)
            elif kind == "linear":
                s = random_scales(linear_weight(prev, transposed).shape[0], seed_here)
                fold_scales_between_linears(prev, linears, s, transposed)
            else:
                n_rep, head_dim = attention_shape(model)
                s = random_scales(linear_weight(prev, transposed).shape[0], seed_here)
                fold_scales_grouped_heads(prev, linears[0], s, n_rep, transposed, head_dim=head_dim)
            done += 1
    return done


# --- exactness on every family -------------------------------------------------------------------


def test_norm_folds_keep_the_model(tiny_model: nn.Module, token_ids: torch.Tensor) -> None:
    randomize_vectors(tiny_model)
    before = logits(tiny_model, token_ids)
    adapter = adapter_for(tiny_model)
    norm = adapter.block_list(tiny_model)[0].get_submodule(adapter.subsets[0].prev)
    gamma = norm.weight.detach().clone()
    assert fold_kind(tiny_model, "norm") == 2 * len(adapter.block_list(tiny_model))
    assert not torch.allclose(norm.weight, gamma)
    assert_same_function(logits(tiny_model, token_ids), before)


@pytest.mark.parametrize("family", ["opt", *LLAMA_LIKE])
def test_linear_folds_keep_the_model(tiny_model: nn.Module, token_ids: torch.Tensor) -> None:
    """OPT: v_proj → out_proj; Llama family: up_proj → down_proj."""
    randomize_vectors(tiny_model)
    before = logits(tiny_model, token_ids)
    assert fold_kind(tiny_model, "linear") == 2
    assert_same_function(logits(tiny_model, token_ids), before)


@pytest.mark.parametrize("family", LLAMA_LIKE)
def test_v_to_o_fold_without_gqa_is_a_linear_fold(make_tiny_model, family, token_ids) -> None:
    model = make_tiny_model(family, num_key_value_heads=4)
    attn_out = next(s for s in adapter_for(model).subsets if s.name == "attn_out")
    assert attn_out.prev_kind == "linear"
    randomize_vectors(model)
    before = logits(model, token_ids)
    assert fold_kind(model, "linear") == 4  # v → o and up → down, two blocks
    assert_same_function(logits(model, token_ids), before)


@pytest.mark.parametrize("family", LLAMA_LIKE)
def test_grouped_heads_fold_keeps_the_model(tiny_model: nn.Module, token_ids) -> None:
    assert attention_shape(tiny_model) == (2, 16)
    randomize_vectors(tiny_model)
    before = logits(tiny_model, token_ids)
    assert fold_kind(tiny_model, "grouped_heads") == 2
    assert_same_function(logits(tiny_model, token_ids), before)


def test_every_declared_fold_together_keeps_the_model(tiny_model, token_ids) -> None:
    randomize_vectors(tiny_model)
    before = logits(tiny_model, token_ids)
    for seed, kind in enumerate(("norm", "linear", "grouped_heads")):
        fold_kind(tiny_model, kind, seed=1000 * seed)
    assert_same_function(logits(tiny_model, token_ids), before)


def test_a_per_query_head_scale_would_not_fold_into_gqa(make_tiny_model, token_ids) -> None:
    """The reason for the grouped fold: scales differing inside a group change the model."""
    model = make_tiny_model("llama")
    block = adapter_for(model).block_list(model)[0]
    v, o = block.self_attn.v_proj, block.self_attn.o_proj
    before = logits(model, token_ids)
    s_o = random_scales(64, 3)
    with pytest.raises(RecipeError, match="64"):
        fold_scales_between_linears(v, [o], s_o, False)
    # Folding the group max into v but the per-head factors into o is *not* exact.
    s_kv = reduce_to_kv_heads(s_o, 2, 16)
    v.weight.data /= s_kv[:, None]
    o.weight.data *= s_o
    with pytest.raises(AssertionError):
        assert_same_function(logits(model, token_ids), before)


# --- SmoothQuant's scales and the head helpers ----------------------------------------------------


def test_smooth_scales_match_a_hand_computation() -> None:
    act = torch.tensor([4.0, 9.0, 1.0])
    weight = torch.tensor([1.0, 4.0, 16.0])
    torch.testing.assert_close(smooth_scales(act, weight, 0.5), torch.tensor([2.0, 1.5, 0.25]))
    torch.testing.assert_close(smooth_scales(act, weight, 1.0), act)
    torch.testing.assert_close(smooth_scales(act, weight, 0.0), 1.0 / weight)
    expected = torch.tensor([4.0**0.8 / 1.0**0.2, 9.0**0.8 / 4.0**0.2, 1.0 / 16.0**0.2])
    torch.testing.assert_close(smooth_scales(act, weight, 0.8), expected)
    # After smoothing, activations and weights have equal abs-max per channel at α = 0.5.
    s = smooth_scales(act, weight, 0.5)
    torch.testing.assert_close(act / s, weight * s)


def test_smooth_scales_handle_zeros_and_tiny_values() -> None:
    act = torch.tensor([0.0, 2.0, 3.0, 1e-9])
    weight = torch.tensor([1.0, 0.0, 1e-9, 4.0])
    s = smooth_scales(act, weight, 0.5)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert s[0] == 1.0 and s[1] == 1.0  # dead activation channel, unread input channel
    torch.testing.assert_close(s[2], torch.tensor(math.sqrt(3.0 / 1e-5)))  # weight clamped
    torch.testing.assert_close(s[3], torch.tensor(math.sqrt(1e-5 / 4.0)))  # activation clamped


def test_smooth_scales_validate_their_inputs() -> None:
    with pytest.raises(RecipeError, match="3 channels.*4 input channels"):
        smooth_scales(torch.ones(3), torch.ones(4), 0.5)
    with pytest.raises(RecipeError, match="1-D"):
        smooth_scales(torch.ones(2, 3), torch.ones(2, 3), 0.5)
    with pytest.raises(RecipeError, match=r"\[0, 1\]"):
        smooth_scales(torch.ones(3), torch.ones(3), 1.5)
    with pytest.raises(RecipeError, match="non-negative"):
        smooth_scales(-torch.ones(3), torch.ones(3), 0.5)
    with pytest.raises(ChannelwiseError, match="NaN"):
        smooth_scales(torch.tensor([1.0, float("nan")]), torch.ones(2), 0.5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_weight_input_absmax_is_the_max_over_rows_and_linears(tiny_model: nn.Module) -> None:
    adapter = adapter_for(tiny_model)
    block = adapter.block_list(tiny_model)[0]
    subset = adapter.subsets[0]
    linears = [block.get_submodule(name) for name in subset.linears]
    stored = [module.weight.detach() for module in linears]
    # Conv1D stores (in, out): a column of the (out, in) view is a row of the stored weight.
    dim = 1 if adapter.transposed_weights else 0
    expected = torch.stack([w.abs().amax(dim=dim) for w in stored]).amax(dim=0)
    got = weight_input_absmax(linears, adapter.transposed_weights)
    assert got.shape == (64,)
    torch.testing.assert_close(got, expected)


def test_kv_head_helpers_map_query_head_h_to_kv_head_h_over_n_rep() -> None:
    # 2 KV heads, n_rep 2, head_dim 3: o channels are heads 0,1 (kv 0) then 2,3 (kv 1).
    s_o = torch.tensor([1.0, 5, 2, 4, 1, 3, 7, 0, 0, 1, 9, 2])
    torch.testing.assert_close(reduce_to_kv_heads(s_o, 2, 3), torch.tensor([4.0, 5, 3, 7, 9, 2]))
    s_kv = torch.tensor([1.0, 2, 3, 4, 5, 6])
    expanded = torch.tensor([1.0, 2, 3, 1, 2, 3, 4, 5, 6, 4, 5, 6])
    torch.testing.assert_close(expand_to_query_heads(s_kv, 2, 3), expanded)
    with pytest.raises(RecipeError, match="multiple of n_rep·head_dim"):
        reduce_to_kv_heads(torch.ones(10), 2, 3)
    with pytest.raises(RecipeError, match="n_rep"):
        expand_to_query_heads(s_kv, 0, 3)


# --- clear errors, nothing changed ----------------------------------------------------------------


def test_shape_errors_are_clear_and_change_nothing(make_tiny_model) -> None:
    model = make_tiny_model("llama")
    block = adapter_for(model).block_list(model)[0]
    norm, mlp = block.post_attention_layernorm, block.mlp
    before = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(RecipeError, match=r"shape \(32,\).*expected \(64,\)"):
        fold_scales_into_norm(norm, [mlp.gate_proj], torch.ones(32), False)
    # down_proj reads 128 channels: validated before the norm or gate_proj is touched.
    with pytest.raises(RecipeError, match="reads 128 channels.*cover 64"):
        fold_scales_into_norm(norm, [mlp.gate_proj, mlp.down_proj], random_scales(64, 0), False)
    with pytest.raises(RecipeError, match="positive"):
        fold_scales_into_norm(norm, [mlp.gate_proj], -torch.ones(64), False)
    with pytest.raises(RecipeError, match="no linears"):
        fold_scales_into_norm(norm, [], torch.ones(64), False)
    with pytest.raises(RecipeError, match="reads 64 channels.*cover 128"):
        fold_scales_between_linears(mlp.up_proj, [mlp.gate_proj], torch.ones(128), False)
    attn = block.self_attn
    with pytest.raises(RecipeError, match=r"o_proj \(n_rep 3\)"):
        fold_scales_grouped_heads(attn.v_proj, attn.o_proj, torch.ones(32), 3, False, head_dim=16)
    with pytest.raises(RecipeError, match="expected \\(32,\\)"):
        fold_scales_grouped_heads(attn.v_proj, attn.o_proj, torch.ones(64), 2, False, head_dim=16)
    with pytest.raises(UnsupportedModelError, match="per-channel weight"):
        fold_scales_into_norm(
            nn.LayerNorm(64, elementwise_affine=False), [mlp.gate_proj], torch.ones(64), False
        )
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a refused fold"


def test_gpt2_transposed_shapes_are_read_as_out_in(make_tiny_model) -> None:
    model = make_tiny_model("gpt2")
    block = model.transformer.h[0]
    # c_attn stores (64, 192): read as (out, in) it is 192×64, reading the 64 norm channels …
    fold_scales_into_norm(block.ln_1, [block.attn.c_attn], torch.ones(64), True)
    # … and mlp.c_proj (stored (128, 64)) reads 128 channels, not the norm's 64.
    with pytest.raises(RecipeError, match=r"64×128 as \(out, in\), stored \(in, out\)\) reads 128"):
        fold_scales_into_norm(block.ln_2, [block.mlp.c_proj], torch.ones(64), True)
    with pytest.raises(RecipeError, match="reads 192 channels.*cover 64"):
        fold_scales_into_norm(block.ln_1, [block.attn.c_attn], torch.ones(64), False)


def test_post_ln_opt_refuses_norm_folding(opt_post_ln: nn.Module) -> None:
    with pytest.raises(UnsupportedModelError, match="post-LN") as info:
        adapter_for(opt_post_ln).require_folding("smoothquant")
    assert "\n" not in str(info.value)
