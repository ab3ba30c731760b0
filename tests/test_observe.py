"""Per-channel statistics: exact running values, bounded percentiles, model-wide collection."""

import pytest
import torch

from channelwise.adapters import adapter_for
from channelwise.observe import ChannelStats, collect_channel_stats


def batches(n=5, rows=300, cols=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(2, rows // 2, cols, generator=g) * torch.arange(1, cols + 1) for _ in range(n)
    ]


def test_running_statistics_equal_those_of_all_tokens():
    data = batches()
    stats = ChannelStats()
    for x in data:
        stats.update(x)
    rows = torch.cat([x.reshape(-1, 8) for x in data])
    assert stats.tokens == rows.shape[0]
    torch.testing.assert_close(stats.min, rows.amin(0))
    torch.testing.assert_close(stats.max, rows.amax(0))
    torch.testing.assert_close(stats.absmax, rows.abs().amax(0))
    torch.testing.assert_close(stats.absmean, rows.abs().mean(0))


def test_percentile_is_exact_while_everything_fits_in_the_sample():
    data = batches()
    stats = ChannelStats(sample_rows=10_000)
    for x in data:
        stats.update(x)
    rows = torch.cat([x.reshape(-1, 8) for x in data])
    torch.testing.assert_close(stats.abs_percentile(99), torch.quantile(rows.abs(), 0.99, dim=0))


def test_reservoir_percentile_estimates_a_large_stream():
    data = batches(n=40, rows=1000)
    stats = ChannelStats(sample_rows=2000)
    for x in data:
        stats.update(x)
    rows = torch.cat([x.reshape(-1, 8) for x in data])
    assert stats.sample.shape == (2000, 8)
    exact = torch.quantile(rows.abs(), 0.9, dim=0)
    assert ((stats.abs_percentile(90) - exact).abs() / exact).max() < 0.1


def test_reservoir_keeps_every_part_of_the_stream_equally():
    stats = ChannelStats(sample_rows=1000)
    for step in range(10):  # row value = its position in the stream
        stats.update(torch.arange(step * 1000, (step + 1) * 1000, dtype=torch.float32)[:, None])
    kept = torch.histc(stats.sample[:, 0], bins=10, min=0, max=10_000)
    assert kept.min() > 60 and kept.max() < 140  # ~100 per tenth of the stream


def test_percentile_before_any_update_is_an_error():
    with pytest.raises(ValueError, match="no statistics"):
        ChannelStats(sample_rows=10).abs_percentile(50)


def test_percentiles_need_a_reservoir():
    stats = ChannelStats()
    stats.update(torch.ones(4, 3))
    assert stats.sample is None
    with pytest.raises(ValueError, match="sample_rows"):
        stats.abs_percentile(50)


def test_collected_abs_max_matches_the_norm_outputs(make_tiny_model, token_ids):
    model = make_tiny_model("llama")
    adapter = adapter_for(model)
    seen = []
    norm = adapter.block_list(model)[1].get_submodule("input_layernorm")
    handle = norm.register_forward_hook(lambda _m, _a, out: seen.append(out.detach()))
    with torch.no_grad():
        model(token_ids)
    handle.remove()
    stats = collect_channel_stats(model, token_ids, batch_size=2, progress=False)
    expected = seen[0].reshape(-1, seen[0].shape[-1]).abs().amax(0)
    torch.testing.assert_close(stats.absmax_matrix("attn_in")[1], expected, rtol=1e-5, atol=1e-6)
    assert set(stats.stats) == {subset.name for subset in adapter.subsets}
    assert stats.absmax_matrix("mlp_out").shape == (2, model.config.intermediate_size)
