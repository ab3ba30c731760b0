"""Tables and pictures: the comparison table and chart, and per-channel outlier heat maps."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib
import numpy as np

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
    """The same rows as a Markdown table (for README and reports): recipe, bits, stored bits per
    weight, ppl, Δ%, calib time and peak memory, KV-cache bytes."""
    lines = [
        "| recipe | bits | bits/weight | ppl | Δ% vs fp | calib s | calib peak MB | "
        "KV bytes vs fp16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| `{row.recipe}` | {row.bits} | {row.weight_bits:.2f} | {row.ppl:.3f} | "
            f"{row.delta_pct:+.2f} | {row.calib_s:.1f} | {row.calib_peak_mb:.0f} | {_kv(row)} |"
        )
    return "\n".join(lines)


def format_vision_markdown(rows: list) -> str:
    """Vision rows (``channelwise.vision.VisionRow``) as a Markdown table: top-1, its change in
    points against fp, agreement with fp predictions, feature cosine to fp."""
    lines = [
        "| recipe | bits | bits/weight | top-1 % | Δ pt vs fp | agreement % | feature cos | "
        "calib s | eval s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| `{row.recipe}` | {row.bits} | {row.weight_bits:.2f} | {row.top1:.2f} | "
            f"{row.delta_pt:+.2f} | {row.agreement:.2f} | {row.feature_cosine:.4f} | "
            f"{row.calib_s:.1f} | {row.eval_s:.1f} |"
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


def read_json(path: str | Path) -> tuple[list[ComparisonRow], dict]:
    """The rows and ``"_meta"`` of a file :func:`write_json` wrote (fields it lacks, from an older
    version, take their defaults)."""
    payload = json.loads(Path(path).read_text(encoding="utf-8"))
    meta = payload.pop("_meta", {})
    fields = set(ComparisonRow.__dataclass_fields__)
    rows = [
        ComparisonRow(**{k: v for k, v in row.items() if k in fields}) for row in payload.values()
    ]
    return rows, meta


#: Perplexities above this multiple of fp's are drawn on the top edge (the list gives them).
OFF_SCALE = 4.0


def plot_comparison(rows: list[ComparisonRow], path: str | Path) -> Path:
    """Perplexity against stored bits per weight (the size/quality trade-off), one marker per
    activation width, the fp level dashed. The axis stops at :data:`OFF_SCALE` × fp: a collapsed
    recipe sits on the top edge, hollow, so it does not squash the rest. Points are numbered
    (points that coincide share one label, ``2,4``) and the numbers named in a column at the
    right with their values, so labels never cover each other or the title."""
    return _plot_tradeoff(
        rows,
        path,
        values=[row.ppl for row in rows],
        off_scale=OFF_SCALE * rows[0].ppl,
        ylabel="perplexity (lower is better)",
        key=("ppl", "Δ% vs fp", [f"{row.ppl:>8.2f}  {row.delta_pct:+.1f}%" for row in rows]),
    )


def plot_vision(rows: list, path: str | Path) -> Path:
    """Top-1 against stored bits per weight for ``channelwise vision`` rows (``VisionRow``),
    drawn as :func:`plot_comparison` draws perplexity (fp dashed, points numbered and named)."""
    return _plot_tradeoff(
        rows,
        path,
        values=[row.top1 for row in rows],
        off_scale=None,
        ylabel="top-1 % through the frozen probe (higher is better)",
        key=("top-1", "Δ pt", [f"{row.top1:>8.2f}  {row.delta_pt:+.2f}" for row in rows]),
    )


def _plot_tradeoff(
    rows: list,
    path: str | Path,
    values: list[float],
    off_scale: float | None,
    ylabel: str,
    key: tuple[str, str, list[str]],
) -> Path:
    """``values`` (row 0: fp) against each row's ``weight_bits``; values above ``off_scale``
    sit hollow on the top edge; ``key`` is (value heading, delta heading, one text per row)."""
    fig, ax = plt.subplots(figsize=(9.5, 5.0))
    fig.subplots_adjust(left=0.09, right=0.64, top=0.88, bottom=0.11)
    base = values[0]
    limit = off_scale if off_scale is not None else float("inf")
    shown = [value for value in values if value <= limit] or [base]
    low, high = min(shown), max(shown)
    pad = 0.08 * (high - low or abs(base) or 1.0)
    top = high + pad
    ax.set_ylim(low - pad, top)
    bits = [row.weight_bits for row in rows]
    ax.set_xlim(min(bits) - 1.0, max(bits) + 1.0)
    styles: dict[str, tuple[str, str]] = {}
    palette = iter([("o", "#4c72b0"), ("s", "#dd8452"), ("^", "#55a868"), ("D", "#c44e52")])
    places = []
    for row, value in zip(rows, values, strict=True):
        width = _activation_label(row.bits)
        if width not in styles:
            styles[width] = next(palette, ("v", "#8172b3"))
        marker, color = styles[width]
        off = value > top
        y = top if off else value
        face = "none" if off else color
        ax.scatter(row.weight_bits, y, marker=marker, facecolors=face, edgecolors=color, s=36,
                   zorder=3, clip_on=False)  # fmt: skip
        places.append((row.weight_bits, y))
    ax.axhline(base, color="black", linestyle="--", linewidth=0.8)
    for width, (marker, color) in styles.items():
        ax.scatter([], [], marker=marker, color=color, label=width)
    if any(value > top for value in values):
        ax.scatter([], [], marker="o", facecolors="none", edgecolors="0.4",
                   label=f"off scale (> {OFF_SCALE:g}× fp)")  # fmt: skip
    ax.legend(title="activations", loc="best", fontsize=8, title_fontsize=8)
    ax.set_xlabel("stored bits per block-linear weight (codes + scales + zeros; fp = 16)")
    ax.set_ylabel(ylabel)
    ax.set_title("Quality against size: each recipe vs fp (dashed), one run", pad=12)
    _number_points(ax, places)
    _name_numbers_in_a_column(fig, rows, key)
    return _save_figure(fig, path)


def _activation_label(bits: str) -> str:
    """``"A8"`` of a bits label such as ``"W4A8 g64"``, ``"float"`` for the float model."""
    found = re.search(r"A(\d+)", bits)
    return "float" if bits == "float" else f"A{found.group(1)}" if found else "A16"


def _number_points(ax, places: list[tuple[float, float]], near_px: float = 11.0) -> None:
    """Write each point's number beside it; points closer than ``near_px`` on screen share
    one label (``2,4``) instead of printing numbers over each other."""
    screen = [ax.transData.transform(place) for place in places]
    groups: list[list[int]] = []
    for i, (x, y) in enumerate(screen):
        for group in groups:
            gx, gy = screen[group[0]]
            if abs(gx - x) < near_px and abs(gy - y) < near_px:
                group.append(i)
                break
        else:
            groups.append([i])
    for group in groups:
        ax.annotate(
            ",".join(str(i + 1) for i in group), places[group[0]], xytext=(5, 3),
            textcoords="offset points", fontsize=7.5, color="0.25", annotation_clip=False,
        )  # fmt: skip


def _name_numbers_in_a_column(fig, rows: list, key: tuple[str, str, list[str]]) -> None:
    """The numbers' key, right of the axes: number, recipe, value, delta vs fp."""
    value_heading, delta_heading, texts = key
    step = min(0.05, 0.77 / max(1, len(rows)))
    width = max(len(row.recipe) for row in rows)
    heading = f"{'':>2}  {'recipe':<{width}} {value_heading:>8}  {delta_heading}"
    fig.text(0.67, 0.86, heading, fontsize=7.5, weight="bold", va="top", family="monospace")
    for number, (row, text) in enumerate(zip(rows, texts, strict=True), start=1):
        fig.text(
            0.67, 0.86 - step * number, f"{number:>2}  {row.recipe:<{width}} {text}",
            fontsize=7.5, va="top", family="monospace",
        )  # fmt: skip


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
        vmin = min(float(np.nanmin(m)) for m in matrices)
        vmax = max(float(np.nanmax(m)) for m in matrices)
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


def plot_softmax_distribution(
    probs: list[torch.Tensor], path: str | Path, bits: int = 4, title: str = ""
) -> Path:
    """Histogram of post-softmax probabilities (log2 axis) for the first, middle and last
    blocks, with the levels a ``bits``-bit uniform quantizer (range [0, max]) and a log√2
    quantizer (``2^(−q/2)``) can represent: most probabilities are tiny, where the uniform grid
    has no level but zero."""
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    picks = sorted({0, len(probs) // 2, len(probs) - 1})
    floor = 2.0**-24
    for index in picks:
        values = probs[index].clamp_min(floor).log2().numpy()
        ax.hist(values, bins=120, histtype="step", density=True, label=f"block {index}")
    top = max(float(p.max()) for p in probs)
    uniform = [top * k / (2**bits - 1) for k in range(1, 2**bits)]
    log_grid = [2.0 ** (-q / 2) for q in range(2**bits)]
    for levels, y, colour, label in (
        (uniform, 0.97, "tab:red", f"uniform {bits}-bit levels"),
        (log_grid, 0.90, "tab:green", f"log√2 {bits}-bit levels"),
    ):
        ax.plot(
            [torch.tensor(v).log2().item() for v in levels], [y] * len(levels), "|",
            color=colour, markersize=12, transform=ax.get_xaxis_transform(), label=label,
        )  # fmt: skip
    ax.set_xlabel("log2(attention probability)  (values below 2^-24 drawn at -24)")
    ax.set_ylabel("density")
    ax.legend(loc="upper center", fontsize=8)
    ax.set_title(title or "post-softmax attention probabilities", fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)


def outlier_ratio(stats: ModelChannelStats, subset: str) -> torch.Tensor:
    """``(n_blocks, channels)``: each channel's abs-max over its block's median channel (0 for
    the channels a narrower block lacks, see :meth:`ModelChannelStats.absmax_matrix`)."""
    matrix = stats.absmax_matrix(subset)
    ratio = matrix / matrix.nanmedian(dim=1).values.clamp_min(1e-12)[:, None]
    return ratio.nan_to_num(nan=0.0)


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
    "plot_vision",
    "read_json",
    "write_atomic",
    "write_json",
]
