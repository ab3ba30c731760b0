"""Outlier methods (OS+, OutlierTune) vs RTN and SmoothQuant on the embedded SmolLM2-135M.

The project's benchmark protocol: calibration on *Emma* (``Protocol().calibration_tokens``:
128 × 512 tokens), perplexity on *Pride and Prejudice* (``Protocol().eval_tokens``: 16 × 512), all
in one run so every Δ% is against the fp perplexity of the same run. Every method runs with its
documented defaults (presets as shipped); nothing is tuned on the evaluation text.

    .venv/bin/python benchmarks/outliers_smollm2.py [--samples 32] [--recipes fp,osplus-w6a6]
        [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from channelwise import Protocol, load_model, perplexity, quantize
from channelwise.recipe import load_recipe

RECIPES = (
    "fp",
    "rtn-w8a8",
    "smoothquant-w8a8",
    "osplus-w8a8",
    "outliertune-w8a8",
    "rtn-w6a6",
    "smoothquant-w6a6",
    "osplus-w6a6",
    "outliertune-w6a6",
    "osplus-w4a4",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, help="use only the first N calibration samples")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated presets")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()

    protocol = Protocol()
    model, tokenizer = load_model(device=args.device)
    calibration = protocol.calibration_tokens(tokenizer)
    if args.samples is not None:
        calibration = calibration[: args.samples]
    windows = protocol.eval_tokens(tokenizer)
    del model

    names = [name.strip() for name in args.recipes.split(",") if name.strip()]
    recipes = [load_recipe(name) for name in names]
    if not recipes or not recipes[0].is_float:
        recipes.insert(0, load_recipe("fp"))  # every Δ% is against fp of the same run
    rows = []
    baseline = None
    for recipe in recipes:
        model, _ = load_model(device=args.device)
        calib_s = 0.0
        if not recipe.is_float:
            calib_s = quantize(model, recipe, calibration, progress=False).calib_seconds
        start = time.perf_counter()
        ppl = perplexity(model, windows, progress=False)
        eval_s = time.perf_counter() - start
        baseline = baseline if baseline is not None else ppl
        row = {
            "recipe": recipe.name,
            "bits": recipe.bits_label(),
            "ppl": ppl,
            "delta_pct": 100.0 * (ppl / baseline - 1.0),
            "calib_s": calib_s,
            "eval_s": eval_s,
        }
        rows.append(row)
        print(
            f"{row['recipe']:<20} {row['bits']:<6} ppl {ppl:8.3f}  Δ {row['delta_pct']:+7.2f}%  "
            f"calib {calib_s:7.1f}s  eval {eval_s:6.1f}s",
            flush=True,
        )
        del model

    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    )
    print(
        f"\ndevice: {args.device} ({device or platform.machine()}), torch "
        f"{torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(
        f"calibration {tuple(calibration.shape)} from {protocol.calib_data}; "
        f"eval {tuple(windows.shape)} from {protocol.eval_data}\n"
    )
    print("| recipe | bits | ppl | Δ% vs fp | calib s |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['recipe']} | {row['bits']} | {row['ppl']:.3f} | {row['delta_pct']:+.2f} | "
            f"{row['calib_s']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"device": args.device, "samples": len(calibration), "rows": rows}, handle, indent=2
            )


if __name__ == "__main__":
    main()
