"""Specification of DGQ: the dual-grained format, its two-phase search, smoothing and the step."""

import math

import pytest
import torch
from helpers import FAMILIES
from torch import nn

from channelwise.adapters import adapter_for, linear_weight
from channelwise.compress import plan, quantize
from channelwise.engine import run_blockwise
from channelwise.errors import NonFiniteError, QuantConfigError, RecipeError, UnsupportedModelError
from channelwise.methods.dgq import DGQ, percentile_clipping_scales
from channelwise.quant.activation import input_quantizer
from channelwise.quant.dual_grained import (
    PHASE1_RATIOS,
    PHASE2_RATIOS,
    dequantize,
    dgq_quantize,
    int8_weight,
    output_error,
    search_channel_scales,
    search_group_scales,
)
from channelwise.recipe import Recipe, Step, load_recipe

WIDE = {  # wide enough that k = int(0.005·C + 1.5) ≥ 2: smoothing actually scales channels
    "llama": dict(hidden_size=256, intermediate_size=512),
    "qwen2": dict(hidden_size=256, intermediate_size=512),
    "mistral": dict(hidden_size=256, intermediate_size=512),
    "qwen3": dict(hidden_size=256, intermediate_size=512),
    "gemma2": dict(hidden_size=256, intermediate_size=512),
    "gemma3_text": dict(hidden_size=256, intermediate_size=512),
    "phi3": dict(hidden_size=256, intermediate_size=512),
    "opt": dict(hidden_size=256, ffn_dim=512, word_embed_proj_dim=256),
    "gpt2": dict(n_embd=256, n_inner=512),
    "gpt_neox": dict(hidden_size=256, intermediate_size=512),
}


def gram(X: torch.Tensor) -> torch.Tensor:
    return X.T @ X / X.shape[0]


def random_problem(out=24, cols=128, tokens=96, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cols, generator=g, dtype=dtype)
    X = torch.randn(tokens, cols, generator=g, dtype=dtype) * (
        0.2 + 3 * torch.rand(cols, generator=g, dtype=dtype)
    )
    return W, X


def adversarial_weights() -> dict[str, torch.Tensor]:
    W, _ = random_problem()
    outlier_rows = W.clone()
    outlier_rows[3] *= 1e4
    outlier_rows[7, 5] = -300.0
    constant = W.clone()
    constant[:, :32] = 0.5
    constant[1, 32:64] = -2.0
    constant[2, 64:96] = 0.0
    zero_rows = W.clone()
    zero_rows[[0, 5, 23]] = 0.0
    return {
        "random": W,
        "outlier_rows": outlier_rows,
        "constant_groups": constant,
        "zero_rows": zero_rows,
        "tiny": W * 1e-37,
        "mixed_tiny": torch.cat([W[:12] * 1e-30, W[12:]]),
    }


# --- the format -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(adversarial_weights()))
@pytest.mark.parametrize("with_gram", [True, False])
def test_int8_reconstruction_is_exact(case: str, with_gram: bool) -> None:
    W = adversarial_weights()[case]
    _, X = random_problem()
    dgw = dgq_quantize(W, gram(X) if with_gram else None, group_size=32)
    assert dgw.codes.dtype == torch.uint8 and dgw.zeros.dtype == torch.uint8
    assert dgw.S2.dtype == torch.int8 and dgw.s1.dtype == torch.float32
    assert dgw.codes.shape == W.shape and dgw.S2.shape == dgw.zeros.shape == (24, 4)
    assert int(dgw.codes.max()) <= 15 and int(dgw.zeros.max()) <= 15
    assert int(dgw.S2.min()) >= 1 and int(dgw.S2.max()) <= 127
    # S2·(q − z) in wide integers: exactly representable in int8.
    q = dgw.codes.long().view(24, 4, 32)
    wide = (dgw.S2.long()[..., None] * (q - dgw.zeros.long()[..., None])).view(24, 128)
    assert int(wide.abs().max()) <= 127
    w8 = int8_weight(dgw)
    assert w8.dtype == torch.int8 and torch.equal(w8.long(), wide)
    deq = dequantize(dgw)
    assert deq.dtype == torch.float32
    assert torch.equal(dgw.s1[:, None] * w8.float(), deq)  # bit for bit
    assert torch.isfinite(deq).all() and (dgw.s1 > 0).all()
    zero_rows = (W == 0).all(dim=1)
    assert (deq[zero_rows] == 0).all()
    err = ((deq - W).norm(dim=1) / W.norm(dim=1).clamp(min=1e-38))[~zero_rows]
    if case != "tiny":  # 1e-37 lies below float32's normal range: only exactness is asked there
        assert err.max() < 0.25, f"relative row error {err.max():.3f}"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused(bad: float) -> None:
    W, X = random_problem()
    W[2, 7] = bad
    with pytest.raises(NonFiniteError, match="NaN/inf"):
        dgq_quantize(W, gram(X), 32)


def test_group_size_must_divide_the_input_channels() -> None:
    W, X = random_problem(cols=96)
    with pytest.raises(QuantConfigError, match="group size 64 does not divide the 96"):
        dgq_quantize(W, gram(X), 64)
    with pytest.raises(QuantConfigError, match="Gram matrix"):
        dgq_quantize(W, torch.eye(64), 32)


# --- the search ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_search_never_does_worse_than_its_first_candidate(seed: int) -> None:
    W, X = random_problem(seed=seed)
    H = gram(X)
    S_g, z, err1 = search_group_scales(W, H, 32)
    _, _, first1 = search_group_scales(W, H, 32, PHASE1_RATIOS[:1])
    assert (err1 <= first1).all() and (err1 < first1).any()
    s1, S2, err2 = search_channel_scales(W, H, S_g, z, 32)
    _, _, first2 = search_channel_scales(W, H, S_g, z, 32, PHASE2_RATIOS[:1])
    assert (err2 <= first2).all() and (err2 < first2).any()
    # The error the search reports is that of the stored weight.
    dgw = dgq_quantize(W, H, 32)
    torch.testing.assert_close(output_error(W, dequantize(dgw), H), err2, rtol=1e-5, atol=0)
    assert torch.equal(dgw.s1, s1.float()) and torch.equal(dgw.S2.float(), S2)


def reference_dgq(W: torch.Tensor, X: torch.Tensor, g: int):
    """A plain loop over rows, groups and ratios, on the tokens themselves (float64)."""
    out, cols = W.shape
    T = X.shape[0]
    codes = torch.zeros(out, cols)
    zeros = torch.zeros(out, cols // g)
    S2s = torch.zeros(out, cols // g)
    s1s = torch.zeros(out)
    for o in range(out):
        S_g, z = [], []
        for k in range(cols // g):
            w, x = W[o, k * g : (k + 1) * g], X[:, k * g : (k + 1) * g]
            lo, hi = min(w.min().item(), 0.0), max(w.max().item(), 0.0)
            best = (math.inf, None, None)
            for r in PHASE1_RATIOS:
                scale = (hi - lo) * r / 15
                zero = min(max(round(-lo * r / scale), 0), 15)
                q = torch.clamp(torch.round(w / scale) + zero, 0, 15)
                err = ((x @ (w - scale * (q - zero))) ** 2).sum().item() / T
                if err < best[0]:
                    best = (err, scale, zero)
            S_g.append(best[1])
            z.append(best[2])
        best = (math.inf, None)
        for r in PHASE2_RATIOS:
            s1 = float(torch.tensor(r * W[o].abs().max().item() / 127, dtype=torch.float32))
            w_hat = torch.zeros(cols, dtype=torch.float64)
            for k in range(cols // g):
                S2 = min(max(round(S_g[k] / s1), 1), 127)
                reach = 127 // S2
                w = W[o, k * g : (k + 1) * g]
                q = torch.round(w / (s1 * S2)) + z[k]
                q = q.clamp(max(z[k] - reach, 0), min(z[k] + reach, 15))
                w_hat[k * g : (k + 1) * g] = s1 * (S2 * (q - z[k]))
            err = ((X @ (W[o] - w_hat)) ** 2).sum().item() / T
            if err < best[0]:
                best = (err, s1)
        s1s[o] = best[1]
        for k in range(cols // g):
            S2 = min(max(round(S_g[k] / best[1]), 1), 127)
            reach = 127 // S2
            w = W[o, k * g : (k + 1) * g]
            q = torch.round(w / (best[1] * S2)) + z[k]
            codes[o, k * g : (k + 1) * g] = q.clamp(max(z[k] - reach, 0), min(z[k] + reach, 15))
            zeros[o, k], S2s[o, k] = z[k], S2
    return codes, zeros, S2s, s1s


def test_quantizer_matches_a_plain_reference_loop() -> None:
    W, X = random_problem(out=6, cols=64, tokens=40, seed=3, dtype=torch.float64)
    W[2, :16] *= 20  # an outlier group, so clipping matters
    dgw = dgq_quantize(W, gram(X), 16)
    codes, zeros, S2, s1 = reference_dgq(W, X, 16)
    assert torch.equal(dgw.zeros.float(), zeros)
    assert torch.equal(dgw.S2.float(), S2)
    assert torch.equal(dgw.s1, s1.float())
    assert torch.equal(dgw.codes.float(), codes)


# --- smoothing ------------------------------------------------------------------------------------


def test_smoothing_scales_follow_the_percentile_rule() -> None:
    a = torch.rand(1000, generator=torch.Generator().manual_seed(0)) + 0.5
    a[[10, 500, 999]] = torch.tensor([40.0, 90.0, 7.0])
    s = percentile_clipping_scales(a)
    k = int(0.005 * 1000 + 1.5)  # 6: the five largest channels are brought down to the sixth
    b = a.sort(descending=True).values[k - 1]
    expected = torch.where(a > b, a / b, torch.ones_like(a))
    assert torch.equal(s, expected) and int((s > 1).sum()) == k - 1
    assert torch.allclose((a / s).max(), b)
    assert torch.equal(percentile_clipping_scales(torch.rand(64)), torch.ones(64))  # k = 1
    assert torch.equal(percentile_clipping_scales(a * 1e-6), torch.ones(1000))  # b < 1e-4


def smoothing_inputs(model: nn.Module, ids: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """Per (block, smoothed subset) the abs-max of the subset's input in the float model."""
    adapter = adapter_for(model)
    found: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for index, block in enumerate(adapter.block_list(model)):
        for subset in adapter.subsets:
            if subset.prev_kind == "norm" or (subset.name, subset.prev_kind) == (
                "mlp_out",
                "linear",
            ):

                def hook(_m, args, key=(index, subset.name)):
                    m = args[0].reshape(-1, args[0].shape[-1]).abs().amax(dim=0)
                    found[key] = m if key not in found else torch.maximum(found[key], m)

                handles.append(
                    block.get_submodule(subset.linears[0]).register_forward_pre_hook(hook)
                )
    with torch.no_grad():
        model(ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothing_follows_the_rule_and_keeps_the_model(
    make_tiny_model, family, calibration_ids, token_ids
) -> None:
    model = make_tiny_model(family, **WIDE[family])
    with torch.no_grad():
        before = model(token_ids, use_cache=False).logits
    absmax = smoothing_inputs(model, calibration_ids)
    (method,) = plan(model, load_recipe("dgq-w4a8"))
    assert isinstance(method, DGQ)
    adapter = adapter_for(model)
    run_blockwise(model, adapter, calibration_ids, method._smooth, batch_size=4, progress=False)
    assert set(method.scales) == set(absmax)
    assert any((s > 1).any() for s in method.scales.values()), "smoothing scaled no channel"
    for key, s in method.scales.items():
        torch.testing.assert_close(s, percentile_clipping_scales(absmax[key]), rtol=1e-5, atol=0)
    with torch.no_grad():
        after = model(token_ids, use_cache=False).logits
    assert ((after - before).abs().max() / before.abs().max()).item() < 1e-5


# --- the step -------------------------------------------------------------------------------------


def dgq_recipe(smooth: bool = True, **updates) -> Recipe:
    recipe = load_recipe("dgq-w4a8")
    steps = (Step(method="dgq", args={"smooth": smooth}),)
    return recipe.model_copy(update={"steps": steps, **updates})


@pytest.mark.parametrize("family", FAMILIES)
def test_step_stores_dgq_weights_and_robust_input_ranges(
    tiny_model, family, calibration_ids, token_ids
) -> None:
    adapter = adapter_for(tiny_model)
    # Without smoothing, every block-0 linear sees in the pipeline what it sees in the float model
    # (all of a block's statistics come from one pass before its weights change).
    block0 = adapter.block_list(tiny_model)[0]
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in adapter.linear_names()}
    handles = [
        block0.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: seen[name].append(args[0].detach())
        )
        for name in seen
    ]
    with torch.no_grad():
        before = tiny_model(token_ids, use_cache=False).logits
        tiny_model(calibration_ids, use_cache=False)
    for handle in handles:
        handle.remove()
    (method,) = plan(tiny_model, dgq_recipe(smooth=False))
    run_blockwise(tiny_model, adapter, calibration_ids, method.apply, batch_size=4, progress=False)
    for index, block in enumerate(adapter.block_list(tiny_model)):
        for name, module in adapter.block_linears(block).items():
            dgw = method.weights[(index, name)]
            weight = linear_weight(module, adapter.transposed_weights)
            assert torch.equal(weight, dequantize(dgw))
            assert input_quantizer(module) is not None
    for name, inputs in seen.items():
        x = inputs[1].reshape(6, 16, -1)  # the calibration batch (OPT's MLP flattens tokens)
        amax = x.abs().amax(dim=1).amin(dim=0).max()
        scale = input_quantizer(block0.get_submodule(name)).qparams.scale
        torch.testing.assert_close(scale, (amax / 127).reshape(1, 1), rtol=1e-5, atol=0)
        assert scale.item() < x.abs().max().item() / 127  # tighter than the min-max range
    with torch.no_grad():
        after = tiny_model(token_ids, use_cache=False).logits
    assert torch.isfinite(after).all()
    assert ((after - before).norm() / before.norm()).item() < 0.5


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_quantize_keeps_the_methods_input_quantizers(tiny_model, calibration_ids) -> None:
    quantize(tiny_model, "dgq-w4a8", calibration_ids, batch_size=4, progress=False)
    adapter = adapter_for(tiny_model)
    for block in adapter.block_list(tiny_model):
        for module in adapter.block_linears(block).values():
            quantizer = input_quantizer(module)
            assert quantizer is not None and quantizer.qparams is not None
            assert quantizer.qparams.scale.shape == (1, 1) and quantizer.spec.bits == 8


def test_post_ln_opt_is_refused_unless_smoothing_is_off(opt_post_ln, calibration_ids) -> None:
    with pytest.raises(UnsupportedModelError, match="dgq smoothing cannot be applied.*post-LN"):
        plan(opt_post_ln, load_recipe("dgq-w4a8"))
    quantize(opt_post_ln, dgq_recipe(smooth=False), calibration_ids, progress=False)


@pytest.mark.parametrize(
    ("weights", "activations", "message"),
    [
        ({"bits": 4, "symmetric": True, "granularity": "group", "group_size": 32}, None, "u4"),
        ({"bits": 8, "symmetric": False, "granularity": "group", "group_size": 32}, None, "u4"),
        ({"bits": 4, "symmetric": False, "granularity": "channel"}, None, "u4"),
        (
            {"bits": 4, "symmetric": False, "granularity": "group", "group_size": 32},
            {"bits": 8, "granularity": "channel"},
            "per tensor and symmetric",
        ),
    ],
)
def test_bad_formats_are_clear_recipe_errors(
    make_tiny_model, weights, activations, message
) -> None:
    recipe = Recipe.from_dict(
        {
            "name": "bad",
            "weights": weights,
            "activations": activations,
            "steps": [{"method": "dgq"}],
        }
    )
    with pytest.raises(RecipeError, match=message) as info:
        plan(make_tiny_model("llama"), recipe)
    assert "\n" not in str(info.value)


def test_group_size_mismatch_fails_before_any_work(make_tiny_model, calibration_ids) -> None:
    model = make_tiny_model("llama", hidden_size=96, intermediate_size=192)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError, match="does not divide"):
        quantize(model, "dgq-w4a8", calibration_ids, progress=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_dgq_after_another_weight_quantizer_is_refused(make_tiny_model) -> None:
    recipe = dgq_recipe().model_copy(update={"steps": (Step(method="rtn"), Step(method="dgq"))})
    with pytest.raises(RecipeError, match="quantizes the weights first"):
        plan(make_tiny_model("llama"), recipe)


def test_presets() -> None:
    dgq, rtn = load_recipe("dgq-w4a8"), load_recipe("rtn-w4a8-g64")
    assert dgq.weights == rtn.weights and dgq.weights.group_size == 64
    assert [step.method for step in dgq.steps] == ["dgq"]
    acts = dgq.activations
    assert (acts.bits, acts.symmetric, acts.granularity, acts.dynamic) == (8, True, "tensor", False)


def test_saved_dgq_model_loads_back_with_identical_logits(
    make_tiny_model, tiny_tokenizer, tmp_path, calibration_ids, token_ids
) -> None:
    from channelwise import load_model, save_quantized

    model = make_tiny_model("llama")
    quantize(model, "dgq-w4a8", calibration_ids, batch_size=4, progress=False)
    with torch.no_grad():
        expected = model(token_ids, use_cache=False).logits
    loaded, _ = load_model(save_quantized(model, tiny_tokenizer, tmp_path / "out"))
    with torch.no_grad():
        assert torch.equal(loaded(token_ids, use_cache=False).logits, expected)
