"""Specification of ``inspect --recipe``: activation statistics before and after a recipe."""

from pathlib import Path

import pytest
import torch

from channelwise.adapters import adapter_for
from channelwise.cli import main
from channelwise.inspect import channel_stats_after, without_attention_quantizers
from channelwise.observe import collect_channel_stats
from channelwise.quant.activation import input_quantizer
from channelwise.recipe import load_recipe
from channelwise.report import outlier_change_summary, outlier_ratio, plot_channel_heatmap

OUTLIER_CHANNEL = 5


def with_outlier_channel(model) -> None:
    """Make channel 5 of every attention-input norm 40× larger: an activation outlier."""
    adapter = adapter_for(model)
    norm = next(s.prev for s in adapter.subsets if s.prev_kind == "norm")
    with torch.no_grad():
        for block in adapter.block_list(model):
            block.get_submodule(norm).weight[OUTLIER_CHANNEL] *= 40.0


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_smoothquant_flattens_an_injected_outlier_channel(
    make_tiny_model, family, calibration_ids
) -> None:
    before_model = make_tiny_model(family)
    with_outlier_channel(before_model)
    before = collect_channel_stats(before_model, calibration_ids, progress=False)
    after_model = make_tiny_model(family)
    with_outlier_channel(after_model)
    after = channel_stats_after(
        after_model, load_recipe("smoothquant-w8a8"), calibration_ids, progress=False
    )
    worst_before = outlier_ratio(before, "attn_in").max().item()
    worst_after = outlier_ratio(after, "attn_in").max().item()
    assert worst_before > 10
    assert worst_after < worst_before / 3
    assert "attn_in" in outlier_change_summary(before, after)


@pytest.mark.parametrize("family", ["llama"])
def test_after_statistics_are_taken_without_any_input_quantizer(
    tiny_model, calibration_ids
) -> None:
    channel_stats_after(tiny_model, load_recipe("rtn-w8a8"), calibration_ids, progress=False)
    assert all(input_quantizer(m) is None for m in tiny_model.modules())
    recipe = without_attention_quantizers(load_recipe("smoothquant-w6a6"))
    assert recipe.attention is None and recipe.activations is not None and recipe.steps


@pytest.mark.parametrize("family", ["llama"])
def test_outliertune_which_needs_the_activation_format_can_be_inspected(
    tiny_model, calibration_ids
) -> None:
    after = channel_stats_after(
        tiny_model, load_recipe("outliertune-w8a8"), calibration_ids, progress=False
    )
    assert all(input_quantizer(m) is None for m in tiny_model.modules())
    # OutlierTune divides its inputs by Δ = a/127: every channel's abs-max becomes 127 (block 0
    # exactly; later blocks see inputs calibrated with activation quantization on, so close).
    absmax = after.absmax_matrix("attn_in")
    torch.testing.assert_close(absmax[0], torch.full_like(absmax[0], 127.0))
    assert ((absmax - 127.0).abs() < 0.1 * 127.0).all()


@pytest.mark.parametrize("family", ["llama"])
def test_side_by_side_heat_map_is_written(tiny_model, calibration_ids, tmp_path: Path) -> None:
    stats = collect_channel_stats(tiny_model, calibration_ids, progress=False)
    out = plot_channel_heatmap([("before", stats), ("after", stats)], tmp_path / "h.png", "t")
    assert out.is_file() and out.read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*tmp*"))


def test_inspect_refuses_an_unknown_recipe_before_loading_anything(capsys, tmp_path) -> None:
    out = tmp_path / "inspect.png"
    code = main(["-q", "inspect", "--recipe", "bogus", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "unknown recipe 'bogus'" in err.strip().splitlines()[-1]
    assert not out.exists()
