"""DGQ W4A8 vs RTN W4A8 (groups of 64) on the embedded SmolLM2-135M, on the benchmark protocol.

Calibrates on *Emma* (``Protocol().calibration_tokens``: 128 × 512 tokens; ``--samples N`` keeps
the first N), evaluates perplexity on *Pride and Prejudice* (``Protocol().eval_tokens``: 16 × 512),
all in one run so every Δ% is against the fp perplexity of the same run. Nothing is tuned on the
evaluation text. Rows: ``fp``, ``rtn-w4a8-g64`` (INT4 asym g64 weights, dynamic per-token INT8
activations) and ``dgq-w4a8`` (DGQ weights, static per-tensor INT8 activations).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dgq_smollm2.py [--samples 32] \
        [--recipes fp,rtn-w4a8-g64,dgq-w4a8] [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import channelwise.methods.dgq  # noqa: F401  (registers the method)
from channelwise import Protocol, load_model, perplexity, quantize
from channelwise.recipe import load_recipe

DEFAULT_RECIPES = "fp,rtn-w4a8-g64,dgq-w4a8"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=None, help="first N calibration samples")
    parser.add_argument("--recipes", default=DEFAULT_RECIPES, help="comma-separated presets")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()

    protocol = Protocol()
    model, tokenizer = load_model(device=args.device)
    calibration = protocol.calibration_tokens(tokenizer)
    if args.samples is not None:
        calibration = calibration[: args.samples]
    windows = protocol.eval_tokens(tokenizer)
    del model

    rows = []
    baseline = None
    for name in args.recipes.split(","):
        recipe = load_recipe(name.strip())
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
            f"{row['recipe']:<16} {row['bits']:<10} ppl {ppl:8.3f}  Δ {row['delta_pct']:+7.2f}%  "
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
        f"eval {tuple(windows.shape)} from {protocol.eval_data}"
    )
    print("(Δ% is against the first row)\n")
    print("| recipe | bits | ppl | Δ% | calib s |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['recipe']} | {row['bits']} | {row['ppl']:.3f} | {row['delta_pct']:+.2f} | "
            f"{row['calib_s']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"device": args.device, "samples": int(calibration.shape[0]), "rows": rows},
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
