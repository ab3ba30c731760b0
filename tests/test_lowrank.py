"""CSKV low-rank K/V projections: ASVD factors, rank, fine-tuning with and without QAT."""

import pytest
import torch

from channelwise.errors import KVCacheError
from channelwise.kvcache.codecs import GroupQuantCodec
from channelwise.kvcache.lowrank import (
    act_scale,
    asvd_factors,
    fake_quantize_ste,
    finetune_factors,
    rank_for,
    relative_mse,
)

HIDDEN, OUT, HEADS = 64, 48, 3


def _outlier_inputs(tokens: int = 1024, seed: int = 0) -> torch.Tensor:
    """Correlated inputs with three outlier channels ~30× the others, as LLM activations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, generator=g) @ (torch.randn(HIDDEN, HIDDEN, generator=g) / 8)
    x[:, [3, 17, 40]] *= 30
    return x


def _weight(seed: int = 1) -> torch.Tensor:
    return torch.randn(OUT, HIDDEN, generator=torch.Generator().manual_seed(seed)) / HIDDEN**0.5


def test_full_rank_reproduces_the_weight():
    w, x = _weight(), _outlier_inputs()
    a, b = asvd_factors(w, act_scale(x), min(OUT, HIDDEN))
    assert a.shape == (HIDDEN, OUT) and b.shape == (OUT, OUT)
    torch.testing.assert_close(a @ b, w.T, atol=1e-5, rtol=1e-5)


def test_asvd_error_is_the_optimal_weighted_low_rank_error():
    w, x, rank = _weight(), _outlier_inputs(), 12
    s = act_scale(x)
    a, b = asvd_factors(w, s, rank)
    err = (s[:, None].double() * (w.T.double() - a.double() @ b.double())).square().sum()
    dropped = torch.linalg.svdvals(s[:, None].double() * w.T.double())[rank:].square().sum()
    assert err.item() == pytest.approx(dropped.item(), rel=1e-4)


def test_act_scale_is_square_root_of_mean_absolute_input():
    x = torch.tensor([[1.0, -4.0, 0.0], [3.0, 12.0, 0.0]])
    torch.testing.assert_close(act_scale(x), torch.tensor([2.0**0.5, 8.0**0.5, 0.0]))


def test_asvd_beats_plain_svd_on_outlier_channels():
    w, x, rank = _weight(), _outlier_inputs(), 12
    a, b = asvd_factors(w, act_scale(x), rank)
    a0, b0 = asvd_factors(w, torch.ones(HIDDEN), rank)
    assert relative_mse(x, w, a, b) < 0.5 * relative_mse(x, w, a0, b0)


def test_inactive_channel_gets_finite_factors():
    w, x = _weight(), _outlier_inputs()
    x[:, 5] = 0
    a, b = asvd_factors(w, act_scale(x), min(OUT, HIDDEN))
    assert torch.isfinite(a).all()
    torch.testing.assert_close(x @ a @ b, x @ w.T, atol=1e-4, rtol=1e-4)


def test_rank_for_rounds_per_head():
    assert rank_for(0.5, 64, 3) == 96
    assert rank_for(0.25, 64, 3) == 48
    assert rank_for(0.7, 64, 3) == 44 * 3
    assert rank_for(1.0, 64, 3) == 192


@pytest.mark.parametrize("quant", [None, "keys", "values"])
def test_finetune_reduces_output_error(quant):
    rank = 12
    spec = {
        None: None,
        "keys": GroupQuantCodec(3, 32, "token").spec,
        "values": GroupQuantCodec(3, rank // HEADS, "channel").spec,
    }[quant]
    w, x = _weight(), _outlier_inputs()
    a, b = asvd_factors(w, act_scale(x), rank)
    a2, b2, report = finetune_factors(x, w, a, b, quant=spec, steps=100, batch_tokens=256)
    assert report["loss_init"] == pytest.approx(relative_mse(x, w, a, b, spec), rel=1e-5)
    assert report["loss_final"] < 0.95 * report["loss_init"]
    assert relative_mse(x, w, a2, b2, spec) == pytest.approx(report["loss_final"], rel=1e-4)


def test_finetune_never_returns_worse_factors():
    w, x = _weight(), _outlier_inputs()
    a, b = asvd_factors(w, act_scale(x), 12)
    a2, b2, report = finetune_factors(x, w, a, b, steps=20, lr=50.0, eval_every=5)
    assert report["loss_final"] == report["loss_init"] and report["best_step"] == 0
    assert torch.equal(a2, a) and torch.equal(b2, b)


def test_ste_passes_gradient_inside_the_clip_range():
    c = torch.randn(64, 12, requires_grad=True)
    spec = GroupQuantCodec(2, 32, "token").spec
    out = fake_quantize_ste(c, spec)
    out.sum().backward()
    assert not torch.equal(out, c)
    assert (c.grad == 1).float().mean() > 0.95 and set(c.grad.unique().tolist()) <= {0.0, 1.0}


def test_ste_gradient_reaches_the_factors():
    w, x = _weight(), _outlier_inputs(256)
    a, b = asvd_factors(w, act_scale(x), 12)
    a.requires_grad_(True)
    c = fake_quantize_ste(x @ a, GroupQuantCodec(2, 32, "token").spec)
    (c @ b - x @ w.T).square().sum().backward()
    assert a.grad.abs().sum() > 0


@pytest.mark.parametrize("rank", [0, 49, 2.0])
def test_rank_out_of_range_raises(rank):
    with pytest.raises(KVCacheError, match="rank"):
        asvd_factors(_weight(), torch.ones(HIDDEN), rank)


def test_bad_inputs_raise():
    w, x = _weight(), _outlier_inputs(256)
    a, b = asvd_factors(w, act_scale(x), 12)
    nan_x = x.clone()
    nan_x[3, 4] = float("nan")
    with pytest.raises(KVCacheError, match="NaN"):
        act_scale(nan_x)
    with pytest.raises(KVCacheError, match="NaN"):
        finetune_factors(nan_x, w, a, b, steps=1)
    with pytest.raises(KVCacheError, match="scale has"):
        asvd_factors(w, torch.ones(HIDDEN + 1), 12)
    with pytest.raises(KVCacheError, match="do not chain"):
        finetune_factors(x[:, :-1], w, a, b, steps=1)
    with pytest.raises(KVCacheError, match="rank"):
        finetune_factors(x, w, a, b[:-1], steps=1)
    with pytest.raises(KVCacheError, match="multiple|groups 32"):
        finetune_factors(x[:100], w, a, b, quant=GroupQuantCodec(2, 32, "token").spec)
    with pytest.raises(KVCacheError, match="does not fit"):
        finetune_factors(x, w, a, b, quant=GroupQuantCodec(2, 5, "channel").spec)
    with pytest.raises(KVCacheError, match="density"):
        rank_for(0.01, 64, 3)
