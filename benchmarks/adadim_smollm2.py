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

import argparse
import json
import math
import time
from collections import defaultdict

import torch

import channelwise as cw
import channelwise.methods.adadim  # noqa: F401  (registers 'adadim')
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated presets")
    parser.add_argument("--samples", type=int, default=128, help="first N calibration samples")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch threads (1 on a shared machine)")
    parser.add_argument("--json", help="also write the rows and choices here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    protocol = cw.Protocol()
    _, tokenizer = cw.load_model(device="cpu")
    windows = protocol.eval_tokens(tokenizer)
    calibration = protocol.calibration_tokens(tokenizer)[: args.samples]

    print(f"torch threads: {torch.get_num_threads()}, device: {args.device}, "
          f"calibration {tuple(calibration.shape)}, eval {tuple(windows.shape)}")  # fmt: skip
    rows, reports = [], []
    for name in args.recipes.split(","):
        recipe = cw.load_recipe(name)
        start = time.perf_counter()
        model, _ = cw.load_model(device=args.device)
        seconds, methods = 0.0, []
        if not recipe.is_float:
            result = cw.quantize(model, recipe, calibration, progress=False)
            seconds, methods = result.calib_seconds, result.methods
        ppl = cw.perplexity(model, windows, progress=False)
        row = {"recipe": name, "bits": recipe.bits_label(), "ppl": ppl, "calib_s": seconds}
        rows.append(row)
        print(f"{name:<26} {row['bits']:<10} ppl {ppl:8.3f}  calib {seconds:7.1f}s  "
              f"wall {time.perf_counter() - start:7.1f}s", flush=True)  # fmt: skip
        for method in methods:
            if isinstance(method, AdaDim):
                reports.append((name, method))
                row["choices"] = {f"{b}.{n}": c for (b, n), c in method.choices.items()}

    for name, method in reports:
        print(f"\n## {name}: per-layer choices\n{method.summary()}\n{outlier_report(method)}")
    print("\n| recipe | bits | ppl | calib s |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['recipe']} | {row['bits']} | {row['ppl']:.3f} | {row['calib_s']:.1f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"samples": args.samples, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
