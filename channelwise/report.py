"""Tables and pictures: the comparison table and chart, and per-channel outlier heat maps."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from channelwise.compare import ComparisonRow  # noqa: E402
from channelwise.observe import ModelChannelStats  # noqa: E402
from channelwise.paths import staged_file, write_atomic  # noqa: E402


def format_table(rows: list[ComparisonRow]) -> str:
    """A fixed-width text table: recipe, bits, perplexity, Δ% vs fp, calibration time and peak
    memory, eval time."""
    header = (
        f"{'recipe':<22} {'bits':<12} {'ppl':>10} {'Δ% vs fp':>10} {'calib s':>9} "
        f"{'calib MB':>9} {'eval s':>8} {'KV bytes':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.recipe:<22} {row.bits:<12} {row.ppl:>10.3f} {row.delta_pct:>+9.1f}% "
            f"{row.calib_s:>9.1f} {row.calib_peak_mb:>9.0f} {row.eval_s:>8.1f} "
            f"{_kv(row):>9}"
        )
    return "\n".join(lines)


def format_markdown(rows: list[ComparisonRow]) -> str:
    """The same rows as a Markdown table (for README and reports): recipe, bits, ppl, Δ%, calib
    time and peak memory."""
    lines = [
        "| recipe | bits | ppl | Δ% vs fp | calib s | calib peak MB | KV bytes vs fp16 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.recipe} | {row.bits} | {row.ppl:.3f} | {row.delta_pct:+.2f} | "
            f"{row.calib_s:.1f} | {row.calib_peak_mb:.0f} | {_kv(row)} |"
        )
    return "\n".join(lines)


def _kv(row: ComparisonRow) -> str:
    """The KV-cache bytes ratio, or a dash for a recipe without a compressed cache."""
    return "—" if row.kv_ratio is None else f"{row.kv_ratio:.3f}×"


def write_json(rows: list[ComparisonRow], path: str | Path, meta: dict | None = None) -> Path:
    """``{recipe: {"ppl": …, "calib_s": …, …}}`` plus a ``"_meta"`` entry describing the run."""
    payload = {row.recipe: row.as_dict() for row in rows}
    if meta:
        payload["_meta"] = meta
    return write_atomic(path, json.dumps(payload, indent=2))


def plot_comparison(rows: list[ComparisonRow], path: str | Path) -> Path:
    """Bar chart of perplexity per recipe, log-scaled when the spread is large."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows)), 4.2))
    values = [row.ppl for row in rows]
    colors = [
        "#4c72b0" if row.delta_pct <= 5 else "#dd8452" if row.delta_pct <= 50 else "#c44e52"
        for row in rows
    ]
    bars = ax.bar(range(len(rows)), values, color=colors)
    ax.set_xticks(
        range(len(rows)),
        [f"{row.recipe}\n{row.bits}" for row in rows],
        rotation=30,
        ha="right",
        fontsize=8,
    )
    if max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.axhline(rows[0].ppl, color="black", linestyle="--", linewidth=0.8, label="fp")
    for bar, row in zip(bars, rows, strict=True):
        ax.annotate(
            f"{row.ppl:.2f}\n{row.delta_pct:+.1f}%",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("Quality cost of each recipe")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_channel_heatmap(
    stats: ModelChannelStats | list[tuple[str, ModelChannelStats]],
    path: str | Path,
    title: str = "",
) -> Path:
    """One row per subset: blocks × channels of the input's abs-max, log colour scale.

    Given ``[(label, stats), …]`` (e.g. before and after a recipe) the panels sit side by side,
    one column each, sharing a colour scale per subset so the columns compare directly.
    """
    columns = [("", stats)] if isinstance(stats, ModelChannelStats) else list(stats)
    names = list(columns[0][1].stats)
    width = 12 if len(columns) == 1 else 8 * len(columns)
    fig, axes = plt.subplots(
        len(names), len(columns), figsize=(width, 2.6 * len(names)), squeeze=False
    )
    for row, name in enumerate(names):
        matrices = [s.absmax_matrix(name).clamp_min(1e-6).log10().numpy() for _, s in columns]
        vmin = min(float(m.min()) for m in matrices)
        vmax = max(float(m.max()) for m in matrices)
        for col, ((label, column), matrix) in enumerate(zip(columns, matrices, strict=True)):
            ax = axes[row, col]
            image = ax.imshow(
                matrix, aspect="auto", cmap="magma", interpolation="nearest", vmin=vmin, vmax=vmax
            )
            prefix = f"{label} — " if label else ""
            ax.set_title(
                f"{prefix}{name}: input of {column.linears[name]} (log10 abs-max per channel)",
                fontsize=9,
            )
            ax.set_ylabel("block")
            ax.set_xlabel("channel")
            fig.colorbar(image, ax=ax, pad=0.01)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save_figure(fig, path)


def outlier_ratio(stats: ModelChannelStats, subset: str) -> torch.Tensor:
    """``(n_blocks, channels)``: each channel's abs-max over its block's median channel."""
    matrix = stats.absmax_matrix(subset)
    return matrix / matrix.median(dim=1).values.clamp_min(1e-12)[:, None]


def outlier_change_summary(before: ModelChannelStats, after: ModelChannelStats) -> str:
    """Per subset, the worst and the typical block's max/median channel ratio, before → after."""
    lines = ["subset      input of                 max/median: worst block   median block"]
    for name in before.stats:
        b, a = outlier_ratio(before, name), outlier_ratio(after, name)
        lines.append(
            f"{name:<11} {before.linears[name]:<24} "
            f"{b.max().item():9.1f}× → {a.max().item():7.1f}×   "
            f"{b.amax(dim=1).median().item():7.1f}× → {a.amax(dim=1).median().item():6.1f}×"
        )
    return "\n".join(lines)


def outlier_summary(stats: ModelChannelStats, top: int = 5) -> str:
    """The worst channels of each subset: abs-max and its ratio to the median channel."""
    lines = []
    for name in stats.stats:
        matrix = stats.absmax_matrix(name)
        ratio = outlier_ratio(stats, name)
        flat = ratio.flatten()
        k = min(top, flat.numel())
        lines.append(
            f"{name} (input of {stats.linears[name]}): max/median "
            f"{ratio.max().item():.1f}×, median block max/median "
            f"{ratio.amax(dim=1).median().item():.1f}×"
        )
        for index in torch.topk(flat, k).indices.tolist():
            block, channel = divmod(index, matrix.shape[1])
            lines.append(
                f"  block {block:>3} channel {channel:>5}: abs-max "
                f"{matrix[block, channel].item():9.2f} = {ratio[block, channel].item():6.1f}× "
                "median"
            )
    return "\n".join(lines)


def _save_figure(fig, path: str | Path) -> Path:
    path = Path(path).expanduser()
    try:
        with staged_file(path) as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return path


__all__ = [
    "format_markdown",
    "format_table",
    "outlier_change_summary",
    "outlier_ratio",
    "outlier_summary",
    "plot_channel_heatmap",
    "plot_comparison",
    "write_atomic",
    "write_json",
]
