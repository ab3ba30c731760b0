"""``compare``: recipes given as names or ``Recipe`` objects, fp first, one ``on_row`` per row."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from channelwise.compare import compare
from channelwise.compress import CompressionResult
from channelwise.evaluate import perplexity
from channelwise.models import load_model
from channelwise.protocol import Protocol
from channelwise.recipe import Step, load_recipe
from channelwise.report import format_markdown


@pytest.fixture
def setup(make_tiny_model, tiny_tokenizer, tmp_path: Path) -> tuple[str, Protocol]:
    """A saved tiny Llama and a protocol on two small random texts (no download)."""
    model_dir = tmp_path / "tiny"
    make_tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    generator = torch.Generator().manual_seed(3)
    texts = {}
    for name in ("calib", "eval"):
        ids = torch.randint(1, 128, (200,), generator=generator).tolist()
        texts[name] = tmp_path / f"{name}.txt"
        texts[name].write_text(" ".join(f"t{i}" for i in ids))
    protocol = Protocol(
        calib_data=str(texts["calib"]),
        eval_data=str(texts["eval"]),
        seqlen=16,
        windows=2,
        start=0,
        calib_samples=2,
    )
    return str(model_dir), protocol


def test_compare_takes_recipe_objects_and_reports_each_row(setup) -> None:
    model_dir, protocol = setup
    base = load_recipe("smoothquant-w8a8")
    variant = base.model_copy(
        update={
            "name": "smoothquant α=0.5",
            "steps": (Step(method="smoothquant", args={"alpha": 0.5}), Step(method="rtn")),
        }
    )
    seen: list[tuple[str, CompressionResult | None]] = []
    rows = compare(
        ["rtn-w8a16", variant],
        model_dir,
        protocol,
        progress=False,
        device="cpu",
        on_row=lambda row, result: seen.append((row.recipe, result)),
    )

    assert [row.recipe for row in rows] == ["fp", "rtn-w8a16", "smoothquant α=0.5"]
    assert [name for name, _ in seen] == [row.recipe for row in rows]
    assert seen[0][1] is None  # fp: nothing quantized
    result = seen[2][1]
    assert result is not None and result.recipe is variant
    assert [m.name for m in result.methods] == ["smoothquant", "rtn"]
    assert result.methods[0].alpha == 0.5
    assert result.calibration_samples == protocol.calib_samples

    model, tokenizer = load_model(model_dir, device="cpu")
    expected = perplexity(model, protocol.eval_tokens(tokenizer), progress=False)
    assert rows[0].ppl == pytest.approx(expected, rel=1e-6)
    assert rows[0].delta_pct == 0.0
    assert rows[2].delta_pct == pytest.approx(100.0 * (rows[2].ppl / rows[0].ppl - 1.0))

    table = format_markdown(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert table[-1].startswith("| `smoothquant α=0.5` | W8A8 | 8.")


@pytest.mark.parametrize("recipes", [["rtn-w8a16", "rtn-w8a16"], ["fp", "fp"]])
def test_a_recipe_named_twice_is_refused_before_any_work(setup, recipes, monkeypatch) -> None:
    from channelwise import compare as compare_module
    from channelwise.errors import RecipeError

    model_dir, protocol = setup
    monkeypatch.setattr(compare_module, "load_model", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(RecipeError, match="given more than once"):
        compare(recipes, model_dir, protocol, progress=False, device="cpu")


def test_two_recipe_files_with_one_name_are_refused(setup, tmp_path: Path) -> None:
    from channelwise.errors import RecipeError

    model_dir, protocol = setup
    for stem in ("a", "b"):
        (tmp_path / f"{stem}.yaml").write_text("name: same\nweights: {bits: 8}\n")
    with pytest.raises(RecipeError, match="same given more than once"):
        compare([str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")], model_dir, protocol)


def test_weight_bits_counts_codes_scales_and_zeros(make_tiny_model) -> None:
    from channelwise.compare import FLOAT_WEIGHT_BITS, weight_bits

    model = make_tiny_model("llama")  # linears 64→64 (q,o), 64→32 (k,v), 64→128 (gate,up), 128→64
    assert weight_bits(load_recipe("fp"), model) == FLOAT_WEIGHT_BITS == 16.0
    # groups of 64 along the input, float32 scale + uint8 zero per group: 4 + 40/64
    assert weight_bits(load_recipe("rtn-w4a16-g64"), model) == pytest.approx(4.625)
    # symmetric per output channel: one float32 scale per row of `in` weights
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
    codes = sum(o * i for o, i in shapes)
    expected = (8 * codes + 32 * sum(o for o, _ in shapes)) / codes
    assert weight_bits(load_recipe("rtn-w8a16"), model) == pytest.approx(expected)
    # float16 scales and float minima (GGUF's Q4_1 blocks of 32): 4 + 32/32
    assert weight_bits(load_recipe("rtn-w4a16-q4_1"), model) == pytest.approx(5.0)


def test_rows_round_trip_through_json(tmp_path: Path) -> None:
    from channelwise.compare import ComparisonRow
    from channelwise.report import read_json, write_json

    rows = [
        ComparisonRow("fp", "float", 26.6, 0.0, 0.0, 1.0),
        ComparisonRow("w4", "W4A16 g64", 33.3, 25.2, 5.9, 1.1, 12.0, None, 4.625),
    ]
    write_json(rows, tmp_path / "r.json", {"windows": 16})
    assert read_json(tmp_path / "r.json") == (rows, {"windows": 16})


def test_chart_numbers_coinciding_points_once_and_keeps_collapsed_recipes_off_scale(
    tmp_path: Path,
) -> None:
    import matplotlib.pyplot as plt

    from channelwise.compare import ComparisonRow
    from channelwise.report import _number_points, plot_comparison

    fig, ax = plt.subplots()
    ax.set_xlim(0, 16)
    ax.set_ylim(20, 40)
    _number_points(ax, [(16.0, 26.6), (8.05, 26.68), (8.05, 26.64), (4.6, 33.3)])
    assert sorted(text.get_text() for text in ax.texts) == ["1", "2,3", "4"]
    plt.close(fig)
    rows = [
        ComparisonRow("fp", "float", 26.6, 0.0, 0.0, 1.0),
        ComparisonRow("w4a4", "W4A4", 7000.0, 26000.0, 1.0, 1.0, weight_bits=4.05),
        ComparisonRow("w4", "W4A16 g64", 33.3, 25.2, 1.0, 1.0, weight_bits=4.625),
    ]
    out = plot_comparison(rows, tmp_path / "chart.png")
    assert out.stat().st_size > 10_000


def test_nan_logits_blame_the_recipe_only_when_there_is_one(make_tiny_model) -> None:
    """A broken float checkpoint was told "the recipe overflows (try wider bits)"."""
    from channelwise import quantize
    from channelwise.errors import NonFiniteError

    windows = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(NonFiniteError, match="carries no recipe: its own weights hold NaN/inf"):
        perplexity(model, windows, progress=False)
    quantize(model, "rtn-w8a16", progress=False)
    with pytest.raises(NonFiniteError, match="the recipe overflows"):
        perplexity(model, windows, progress=False)
