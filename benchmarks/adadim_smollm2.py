"""AdaDim (per-OC vs per-IC per linear) against RTN and GPTQ on the embedded SmolLM2-135M.

Heo et al., arXiv 2309.15531. Calibration: ``Protocol().calibration_tokens`` (Emma, 128 × 512; the
first ``--samples`` of them); evaluation: Pride and Prejudice, 16 windows × 512. Every row starts
from a fresh model. For each AdaDim row it prints which linears picked per-IC, and how that
follows the activation outliers: each linear input's per-channel abs-max ratio (max / median)::

    .venv/bin/python benchmarks/adadim_smollm2.py                 # every row, 128 samples
    .venv/bin/python benchmarks/adadim_smollm2.py --samples 16 \
        --recipes fp,rtn-w4a16-g64,adadim-w4a16-g64
    .venv/bin/python benchmarks/adadim_smollm2.py --threads 1 --json adadim.json
"""

from __future__ import annotations

import math
from collections import defaultdict

import common  # benchmarks/common.py: this folder is on sys.path when run as a script
import torch

import channelwise.methods.adadim  # noqa: F401  (registers 'adadim')
from channelwise.compare import ComparisonRow
from channelwise.compress import CompressionResult
from channelwise.methods.adadim import AdaDim

RECIPES = (
    "fp",
    "rtn-w4a16-g64",
    "adadim-w4a16-g64",
    "gptq-w4a16-g64",
    "adadim-gptq-w4a16-g64",
    "rtn-w3a16-g64",
    "gptq-w3a16-g64",
    "adadim-gptq-w3a16-g64",
)


def ranks(values: list[float]) -> torch.Tensor:
    order = torch.tensor(values, dtype=torch.float64).argsort()
    out = torch.empty(len(values), dtype=torch.float64)
    out[order] = torch.arange(len(values), dtype=torch.float64)
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def outlier_report(method: AdaDim) -> str:
    """Per linear kind: per-IC picks, and whether the per-IC gain follows the input outliers.

    The gain is ``log(err per-OC / err per-IC)`` (> 0: per-IC better); the outlier measure is the
    linear input's per-channel abs-max ratio max / median. Kinds are compared separately: q/k/v
    share one input, so across kinds the ratio cannot tell them apart.
    """
    kinds: dict[str, list[tuple[str, float, float, int]]] = defaultdict(list)
    for (block, name), choice in method.choices.items():
        err = method.errors[(block, name)]
        gain = math.log(err["per_oc"] / err["per_ic"]) if err["per_ic"] > 0 else 0.0
        kinds[name].append((choice, method.input_ratio[(block, name)], gain, block))
    lines = [f"{'linear':<20} {'per-IC':>6} {'ratio IC':>9} {'ratio OC':>9} {'Spearman':>9}  "
             "top-3 ratio blocks (choice)"]  # fmt: skip
    for name, rows in kinds.items():
        picks = [r for r in rows if r[0] == "per_ic"]
        others = [r for r in rows if r[0] == "per_oc"]

        def median(group):
            return torch.tensor([r[1] for r in group]).median().item() if group else float("nan")

        rho = spearman([r[1] for r in rows], [r[2] for r in rows]) if len(rows) > 2 else 0.0
        top = sorted(rows, key=lambda r: -r[1])[:3]
        tops = ", ".join(f"{r[3]}: {r[1]:.0f} ({r[0]})" for r in top)
        lines.append(f"{name:<20} {len(picks):>3}/{len(rows):<2} {median(picks):>9.1f} "
                     f"{median(others):>9.1f} {rho:>+9.2f}  {tops}")  # fmt: skip
    lines.append(
        "ratio IC/OC: median input max/median abs-max ratio where per-IC/per-OC won; Spearman: "
        "rank correlation of that ratio with log(err per-OC / err per-IC) over blocks"
    )
    return "\n".join(lines)


def main() -> None:
    args = common.parser(__doc__, RECIPES).parse_args()
    reports: list[tuple[str, AdaDim]] = []

    def keep_adadim(row: ComparisonRow, result: CompressionResult | None) -> None:
        methods = result.methods if result is not None else []
        reports.extend((row.recipe, m) for m in methods if isinstance(m, AdaDim))

    rows = common.run(args, common.recipe_names(args), on_row=keep_adadim)
    for name, method in reports:
        print(f"\n## {name}: per-layer choices\n{method.summary()}\n{outlier_report(method)}")
    choices = {name: {f"{b}.{n}": c for (b, n), c in m.choices.items()} for name, m in reports}
    common.report(args, rows, extra={"choices": choices})


if __name__ == "__main__":
    main()
