"""Specification of GPTQ (arXiv 2210.17323): exact against a plain reference, better than RTN."""

from dataclasses import replace

import pytest
import torch
from helpers import logits

import channelwise.methods.gptq as gptq_module  # registers 'gptq' whatever methods/__init__ holds
from channelwise.adapters import adapter_for, linear_weight
from channelwise.compress import quantize
from channelwise.engine import run_blockwise
from channelwise.errors import ChannelwiseError, RecipeError
from channelwise.methods.gptq import gptq_quantize, observe_hessians
from channelwise.quant import QParams, QuantSpec, compute_qparams, fake_quantize
from channelwise.quant.granularity import PerColumn, PerGroup, PerRow, PerTensor
from channelwise.recipe import QuantArgs, Recipe, Step, load_recipe

PER_CHANNEL = QuantSpec(bits=4, symmetric=False, granularity=PerRow())
PER_GROUP = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(8))
SPECS = {
    "channel": PER_CHANNEL,
    "group": PER_GROUP,
    "tensor-sym3": QuantSpec(bits=3, symmetric=True, granularity=PerTensor()),
    "group-mse": QuantSpec(bits=3, symmetric=False, granularity=PerGroup(8), range_method="mse"),
}


def reference_gptq(W, H, spec, damp=0.01, act_order=False, static_groups=False):
    """Plain GPTQ: one column at a time, the whole remainder updated at once, float64."""
    W, H = W.double().clone(), H.double().clone()
    for i in range(H.shape[0]):
        if H[i, i] == 0:
            H[i, i] = 1
            W[:, i] = 0
    per_ic = isinstance(spec.granularity, PerColumn) or (
        isinstance(spec.granularity, PerGroup) and spec.granularity.along == "output"
    )
    grouped = isinstance(spec.granularity, PerGroup) and not per_ic
    column_spec = replace(spec, granularity=PerRow()) if grouped else spec
    fixed = compute_qparams(W, spec) if not per_ic and (not grouped or static_groups) else None
    n = W.shape[1]
    perm = torch.argsort(H.diag(), descending=True, stable=True) if act_order else torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    H = H + damp * H.diag().mean() * torch.eye(n, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H)).T  # upper, UᵀU = H⁻¹
    Q = torch.zeros_like(W)
    qparams = fixed
    for j in range(n):
        if grouped and static_groups:
            g = int(perm[j]) // spec.granularity.size
            qparams = QParams(fixed.scale[:, g : g + 1], fixed.zero_point[:, g : g + 1])
        elif grouped and j % spec.granularity.size == 0:
            qparams = compute_qparams(W[:, j : j + spec.granularity.size], column_spec)
        elif per_ic:  # the column itself, as it stands after the earlier columns' feedback
            qparams = compute_qparams(W[:, j : j + 1], spec)
        Q[:, j] = fake_quantize(W[:, j : j + 1], column_spec, qparams)[:, 0]
        W[:, j + 1 :] -= torch.outer((W[:, j] - Q[:, j]) / U[j, j], U[j, j + 1 :])
    return Q[:, torch.argsort(perm)]


def random_problem(seed: int, out: int = 12, n_in: int = 32, tokens: int = 256):
    """A weight and the Hessian of correlated inputs with uneven channel scales."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n_in, generator=gen)
    X = torch.randn(tokens, n_in, generator=gen) @ torch.randn(n_in, n_in, generator=gen)
    X = X * torch.rand(n_in, generator=gen) * 3
    return W, 2 / tokens * X.T @ X


def correlated_inputs(seed: int, tokens: int = 2048, n_in: int = 64, rank: int = 6):
    """X = Z·A + small noise: strongly correlated features."""
    gen = torch.Generator().manual_seed(seed)
    Z = torch.randn(tokens, rank, generator=gen)
    A = torch.randn(rank, n_in, generator=gen)
    return (Z @ A + 0.05 * torch.randn(tokens, n_in, generator=gen)).double()


# --- exactness -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block_size", [3, 4, 128])
def test_lazy_blocks_match_plain_column_by_column_gptq(spec_name, act_order, block_size):
    spec = SPECS[spec_name]
    for seed in range(3):
        W, H = random_problem(seed)
        if seed == 2:  # dead inputs
            H[[5, 20]] = 0
            H[:, [5, 20]] = 0
        ours = gptq_quantize(W, H, spec, block_size=block_size, act_order=act_order)[0]
        torch.testing.assert_close(ours, reference_gptq(W, H, spec, act_order=act_order),
                                   rtol=0, atol=1e-5)  # fmt: skip
        assert not torch.equal(ours, fake_quantize(W.double(), spec))  # feedback did something


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block_size", [4, 128])
def test_static_groups_match_plain_gptq_and_keep_the_original_groups(act_order, block_size):
    W, H = random_problem(7)
    ours = gptq_quantize(W, H, PER_GROUP, 0.01, block_size, act_order, static_groups=True)[0]
    expected = reference_gptq(W, H, PER_GROUP, act_order=act_order, static_groups=True)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    # On the grid of the original weight's contiguous groups:
    qparams = compute_qparams(W, PER_GROUP)
    torch.testing.assert_close(ours, fake_quantize(ours, PER_GROUP, qparams), rtol=0, atol=1e-6)


def test_identity_hessian_reduces_to_round_to_nearest():
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    for spec in (PER_CHANNEL, PER_GROUP, SPECS["tensor-sym3"]):
        ours = gptq_quantize(W, torch.eye(64) * 0.37, spec, block_size=16)[0]
        assert torch.equal(ours.float(), fake_quantize(W, spec))
    ours = gptq_quantize(W, torch.eye(64), PER_CHANNEL, act_order=True)[0]
    assert torch.equal(ours.float(), fake_quantize(W, PER_CHANNEL))


def test_result_does_not_depend_on_the_hessian_scale():
    W, H = random_problem(4)
    torch.testing.assert_close(
        gptq_quantize(W, H, PER_GROUP)[0],
        gptq_quantize(W, 1000 * H, PER_GROUP)[0],
        rtol=0,
        atol=1e-5,
    )


# --- quality ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [PER_CHANNEL, QuantSpec(3, False, PerGroup(16))], ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_output_error_is_well_below_rtn_on_correlated_inputs(spec, act_order):
    X = correlated_inputs(0)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(5)).double()
    H = 2 / X.shape[0] * X.T @ X
    ours = gptq_quantize(W, H, spec, act_order=act_order)[0]

    def output_error(Wq):
        return (X @ W.T - X @ Wq.T).square().sum().item()

    assert output_error(ours) < 0.5 * output_error(fake_quantize(W, spec))
    # Every group of every row holds at most 2^bits distinct levels.
    size = spec.granularity.size if isinstance(spec.granularity, PerGroup) else 64
    if act_order and size < 64:
        return  # groups run over the permuted columns; checked with static_groups above
    groups = ours.float().reshape(32, 64 // size, size)
    levels = max(len(torch.unique(groups[r, g])) for r in range(32) for g in range(64 // size))
    assert levels <= 2**spec.bits
    qparams = compute_qparams(W.float(), spec) if size == 64 else None
    if qparams is not None:  # per channel: the very grid of the original weight
        assert torch.equal(fake_quantize(ours.float(), spec, qparams), ours.float())


def test_dead_inputs_are_zeroed_without_nans():
    W, H = random_problem(2)
    H[[3, 17]] = 0
    H[:, [3, 17]] = 0
    for act_order in (False, True):
        ours = gptq_quantize(W, H, PER_GROUP, act_order=act_order, block_size=5)[0]
        assert torch.isfinite(ours).all()
        assert (ours[:, [3, 17]] == 0).all()
        assert (ours[:, [0, 1, 2, 4]] != 0).any()
    all_dead = gptq_quantize(W, torch.zeros(32, 32), PER_CHANNEL)[0]
    assert torch.equal(all_dead, torch.zeros_like(all_dead))


# --- errors ----------------------------------------------------------------------------------


# --- per input channel (AdaDim's per-IC GPTQ, arXiv 2309.15531) ------------------------------

PER_IC = {
    "input_channel": QuantSpec(bits=4, symmetric=False, granularity=PerColumn()),
    "groups-of-outputs": QuantSpec(bits=3, symmetric=False, granularity=PerGroup(4, "output")),
}


@pytest.mark.parametrize("spec_name", PER_IC)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block_size", [5, 128])
def test_per_input_channel_matches_plain_gptq_with_scales_from_the_updated_column(
    spec_name, act_order, block_size
):
    spec = PER_IC[spec_name]
    for seed in range(3):
        W, H = random_problem(seed)  # 12 outputs: groups of 4 outputs per input column
        if seed == 2:
            H[[5, 20]] = 0
            H[:, [5, 20]] = 0
        ours = gptq_quantize(W, H, spec, block_size=block_size, act_order=act_order)[0]
        expected = reference_gptq(W, H, spec, act_order=act_order)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
        assert not torch.equal(ours, fake_quantize(W.double(), spec))  # feedback did something
        # Every column is on its own per-IC grid: at most 2^bits levels per group of outputs.
        rows = spec.granularity.size if isinstance(spec.granularity, PerGroup) else 12
        groups = ours.T.reshape(32, 12 // rows, rows)
        assert max(len(torch.unique(g)) for g in groups.reshape(-1, rows)) <= 2**spec.bits


@pytest.mark.parametrize("spec_name", PER_IC)
def test_identity_hessian_reduces_to_per_input_channel_round_to_nearest(spec_name):
    spec = PER_IC[spec_name]
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    for act_order in (False, True):
        ours = gptq_quantize(W, torch.eye(64) * 0.37, spec, act_order=act_order)[0]
        assert torch.equal(ours.float(), fake_quantize(W, spec))


def test_per_input_channel_beats_its_rtn_on_correlated_inputs():
    X = correlated_inputs(1)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(6)).double()
    H = 2 / X.shape[0] * X.T @ X
    spec = QuantSpec(3, False, PerGroup(16, "output"))
    ours = gptq_quantize(W, H, spec, act_order=True)[0]

    def output_error(Wq):
        return (X @ W.T - X @ Wq.T).square().sum().item()

    assert output_error(ours) < 0.5 * output_error(fake_quantize(W, spec))


@pytest.mark.parametrize("granularity", [PerColumn(), PerGroup(4, "output")], ids=str)
def test_static_groups_with_scales_inside_a_column_are_refused(granularity):
    W, H = random_problem(0)
    with pytest.raises(RecipeError, match="static_groups.*AdaDim"):
        gptq_quantize(W, H, QuantSpec(4, False, granularity), static_groups=True)[0]


def test_groups_of_outputs_must_divide_the_output_channels():
    W, H = random_problem(0)  # 12 outputs
    with pytest.raises(RecipeError, match="group size 8 does not divide 12 output channels"):
        gptq_quantize(W, H, QuantSpec(4, False, PerGroup(8, "output")))


def test_input_channel_recipe_with_static_groups_is_refused_before_any_change(
    make_tiny_model, calibration_ids
):
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = Recipe(
        name="gptq-ic",
        weights=QuantArgs(bits=4, symmetric=False, granularity="input_channel"),
        steps=(Step(method="gptq", args={"static_groups": True}),),
    )
    with pytest.raises(RecipeError, match="gptq-ic.*static_groups"):
        quantize(model, recipe, calibration_ids, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_input_channel_recipe_runs_on_a_tiny_model(make_tiny_model, calibration_ids):
    model = make_tiny_model("llama")
    recipe = Recipe(
        name="gptq-ic",
        weights=QuantArgs(bits=4, symmetric=False, granularity="group", group_size=16,
                          group_along="output"),
        steps=(Step(method="gptq", args={"act_order": True}),),
    )  # fmt: skip
    quantize(model, recipe, calibration_ids, progress=False)
    weight = model.model.layers[1].mlp.down_proj.weight  # (64, 128): 4 groups per column
    groups = weight.T.reshape(128, 4, 16)
    assert max(len(torch.unique(g)) for g in groups.reshape(-1, 16)) <= 16


def test_unknown_or_invalid_args_are_recipe_errors(make_tiny_model, calibration_ids):
    for args in ({"dampp": 0.1}, {"block_size": 0}, {"damp": -1}):
        recipe = Recipe(
            name="bad", weights=QuantArgs(bits=4), steps=(Step(method="gptq", args=args),)
        )
        with pytest.raises(RecipeError, match="bad"):
            quantize(make_tiny_model("llama"), recipe, calibration_ids, progress=False)


def test_inverse_hessian_in_place_equals_the_copying_one_and_reuses_the_memory():
    W, H = random_problem(5, n_in=48)
    H = H.double()
    H[:, 7] = H[7, :] = 0  # a dead input
    for act_order in (False, True):
        copied = gptq_module.invert_hessian(H, 0.01, act_order, "w")
        work = H.clone()
        in_place = gptq_module.invert_hessian(work, 0.01, act_order, "w", overwrite=True)
        assert in_place.upper.data_ptr() == work.data_ptr()
        torch.testing.assert_close(in_place.upper, copied.upper, rtol=0, atol=1e-12)
        assert torch.equal(in_place.perm, copied.perm) and in_place.dead.tolist()[7]
        assert torch.equal(  # the shared inverse gives what the Hessian itself gives
            gptq_quantize(W, in_place, PER_GROUP, act_order=act_order)[0],
            gptq_quantize(W, H, PER_GROUP, act_order=act_order)[0],
        )
    U = copied.upper  # UᵀU = (H + λI)⁻¹ in act order
    damped = H.clone()
    damped.diagonal()[7] = 1
    damped += 0.01 * damped.diagonal().mean() * torch.eye(48, dtype=H.dtype)
    damped = damped[copied.perm][:, copied.perm]
    torch.testing.assert_close(U.T @ U @ damped, torch.eye(48, dtype=H.dtype), atol=1e-9, rtol=0)


@pytest.mark.parametrize("n, block", [(1, 4), (7, 4), (8, 4), (13, 4), (600, 512)])
def test_triangular_inverse_in_place_equals_the_plain_inverse(n, block):
    gen = torch.Generator().manual_seed(n)
    A = torch.randn(n, 2 * n, generator=gen, dtype=torch.float64)
    L = torch.linalg.cholesky(A @ A.T / n + torch.eye(n, dtype=torch.float64))  # well-conditioned
    expected = torch.linalg.inv(L)
    gptq_module._invert_lower_triangular_(L, block)
    torch.testing.assert_close(L, expected, rtol=0, atol=1e-9)
    assert torch.equal(L.triu(1), torch.zeros_like(L))


@pytest.mark.parametrize("n", [1, 2, 5, 1030])  # 1030: three blocks of the triangular inverse
def test_inverse_cholesky_equals_the_factor_of_the_plain_inverse(n):
    X = correlated_inputs(n, tokens=max(2 * n, 64), n_in=n, rank=max(n // 2, 1))
    H = X.T @ X
    U = gptq_module.inverse_cholesky(H, 0.01, "w")
    damped = H + 0.01 * H.diagonal().mean() * torch.eye(n, dtype=H.dtype)
    expected = torch.linalg.cholesky(torch.linalg.inv(damped)).T
    torch.testing.assert_close(U, expected, rtol=1e-7, atol=1e-9 * expected.abs().max().item())
    assert torch.equal(U.tril(-1), torch.zeros_like(U))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_hessian_names_the_layer(bad):
    H = torch.eye(6, dtype=torch.float64)
    H[2, 3] = H[3, 2] = bad
    with pytest.raises(ChannelwiseError, match=r"Hessian of model\.layers\.0\.q_proj"):
        gptq_module.inverse_cholesky(H, 0.01, "model.layers.0.q_proj")


PEAK_SCRIPT = """
import resource, sys, torch
from channelwise.methods.gptq import invert_hessian
invert_hessian(torch.eye(64, dtype=torch.float64), 0.01, True, "warm-up")
n = 2400
H = torch.eye(n, dtype=torch.float64) * n
for _ in range(6):
    a = torch.randn(n, 256, dtype=torch.float64)
    H.addmm_(a, a.T)
del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
invert_hessian(H, 0.01, sys.argv[2] == "act", "w", overwrite=sys.argv[1] == "in-place")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024 / H.numel() / 8)
"""


def hessian_copies(mode: str, order: str) -> float:
    """How many more Hessian-sized matrices inverting one held at its peak, in a fresh process."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, mode, order], capture_output=True, text=True, check=True
    )
    return float(run.stdout)


def test_inverting_a_hessian_in_place_holds_at_most_one_more_matrix():
    """A 7B down_proj's Hessian is 2.7 GiB: the factorization may not hold four of them. With
    act-order (which also permutes) this measures 0.66 extra matrices (0.37 without); copying,
    1.8–2.1; before the factorization worked in place, 3 or more; with ``isfinite(H)`` as the
    final check, 1.16."""
    assert hessian_copies("in-place", "act") < 1.0


def test_linears_that_read_one_input_share_one_inverse(monkeypatch, make_tiny_model, lm_data):
    calls = []
    real = gptq_module.invert_hessian

    def spy(H, *args, **kwargs):
        calls.append(kwargs.get("overwrite", False))
        return real(H, *args, **kwargs)

    monkeypatch.setattr(gptq_module, "invert_hessian", spy)
    model = make_tiny_model("llama")
    quantize(model, "gptq-w4a16-g64", lm_data[0], batch_size=8, progress=False)
    blocks = len(model.model.layers)  # q,k,v · o · gate,up · down: 4 inverses for 7 linears
    assert calls == [True] * 4 * blocks


def test_indefinite_hessian_names_the_layer_and_suggests_damp():
    H = torch.tensor([[1.0, 10.0], [10.0, 1.0]])
    with pytest.raises(ChannelwiseError, match=r"model\.layers\.3\.mlp\.up_proj.*larger damp"):
        gptq_quantize(torch.ones(2, 2), H, PER_CHANNEL, name="model.layers.3.mlp.up_proj")[0]


def test_cholesky_failure_in_a_model_is_a_clear_error(
    monkeypatch, make_tiny_model, calibration_ids
):
    def broken(ctx, subsets):
        return {subset.name: -torch.eye(64, dtype=torch.float64) for subset in subsets}

    monkeypatch.setattr(gptq_module, "observe_hessians", broken)
    with pytest.raises(ChannelwiseError, match=r"model\.layers\.0\.self_attn\.q_proj.*damp") as e:
        quantize(make_tiny_model("llama"), "gptq-w4a16-g64", calibration_ids, progress=False)
    assert e.value.__cause__ is None and e.value.__context__ is None  # no torch traceback


def test_preset_needs_calibration(tiny_model):
    model = tiny_model
    with pytest.raises(RecipeError, match="calibration"):
        quantize(model, "gptq-w4a16-g64", progress=False)
    assert load_recipe("gptq-w3a16-g64").weights.bits == 3


def test_hessians_cover_every_calibration_token_of_each_subset(make_tiny_model, lm_data):
    model = make_tiny_model("gpt_neox")
    adapter = adapter_for(model)
    checked = []

    def check_block(ctx):
        ours = observe_hessians(ctx, adapter.subsets)
        firsts = tuple(subset.linears[0] for subset in adapter.subsets)
        with ctx.capture_inputs(firsts) as captured:
            ctx.forward()
        for subset in adapter.subsets:
            X = torch.cat([x.reshape(-1, x.shape[-1]) for x in captured[subset.linears[0]]])
            assert X.shape[0] == 32 * 32
            expected = 2 / X.shape[0] * X.double().T @ X.double()
            torch.testing.assert_close(ours[subset.name], expected, rtol=1e-5, atol=1e-6)
        checked.append(ctx.index)

    run_blockwise(model, adapter, lm_data[0], check_block, batch_size=8, progress=False)
    assert checked == [0, 1]


# --- models ----------------------------------------------------------------------------------


@pytest.fixture
def lm_data():
    """Calibration (32 × 32) and held-out evaluation (8 × 32) token ids of the tiny vocabulary."""
    gen = torch.Generator().manual_seed(11)
    return torch.randint(0, 128, (32, 32), generator=gen), torch.randint(0, 128, (8, 32))


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_beats_rtn_on_the_logits_of_every_family(family, bits, make_tiny_model, lm_data):
    """Held-out logits MSE vs float; on these models GPTQ measures 0.45–0.7× RTN's."""
    calibration, evaluation = lm_data
    reference = logits(make_tiny_model(family), evaluation)
    errors = {}
    for method in ("rtn", "gptq"):
        model = make_tiny_model(family)
        quantize(model, f"{method}-w{bits}a16-g64", calibration, batch_size=8, progress=False)
        errors[method] = (logits(model, evaluation) - reference).square().mean().item()
    assert errors["gptq"] < 0.9 * errors["rtn"], errors


@pytest.mark.parametrize(("sequential", "passes"), [(True, 4), (False, 1)])
def test_true_sequential_observes_each_subset_after_the_earlier_ones_are_quantized(
    sequential, passes, make_tiny_model, lm_data, monkeypatch
):
    calibration, evaluation = lm_data
    reference = logits(make_tiny_model("llama"), evaluation)
    model = make_tiny_model("llama")
    linears = adapter_for(model).block_linears(model.model.layers[0])
    original = {name: module.weight.clone() for name, module in linears.items()}
    observed = []

    def spy(ctx, subsets):
        if ctx.index == 0:  # how many of the block's linears are already quantized
            done = sum(not torch.equal(m.weight, original[n]) for n, m in linears.items())
            observed.append(([s.name for s in subsets], done))
        return observe_hessians(ctx, subsets)

    monkeypatch.setattr(gptq_module, "observe_hessians", spy)
    recipe = load_recipe("gptq-w4a16-g64").model_copy(
        update={"steps": (Step(method="gptq", args={"true_sequential": sequential}),)}
    )
    quantize(model, recipe, calibration, progress=False)
    assert len(observed) == passes
    if sequential:  # q,k,v (3) → o (1) → gate,up (2) → down: quantized before each observation
        assert [done for _, done in observed] == [0, 3, 4, 6]
    else:
        assert observed == [(["attn_in", "attn_out", "mlp_in", "mlp_out"], 0)]
    error = (logits(model, evaluation) - reference).square().mean().item()
    assert 0 < error < 0.05 * reference.square().mean().item()


def test_transposed_gpt2_weights_are_quantized_in_place_on_grid(make_tiny_model, lm_data):
    calibration, _ = lm_data
    model = make_tiny_model("gpt2")
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    quantize(model, "gptq-w4a16-g64", calibration, progress=False)
    assert before == {n: p.data_ptr() for n, p in model.named_parameters()}
    adapter = adapter_for(model)
    for block in adapter.block_list(model):
        for module in adapter.block_linears(block).values():
            weight = linear_weight(module, adapter.transposed_weights)
            groups = weight.reshape(weight.shape[0], -1, 64)
            assert max(len(torch.unique(g)) for g in groups.reshape(-1, 64)) <= 16
