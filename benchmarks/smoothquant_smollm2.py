"""SmoothQuant vs RTN on the embedded SmolLM2-135M, on the project's benchmark protocol.

Calibrates on *Emma* (``Protocol().calibration_tokens``: 128 × 512 tokens), evaluates perplexity
on *Pride and Prejudice* (``Protocol().eval_tokens``: 16 × 512), all in one run so every Δ% is
against the fp perplexity of the same run. α is not tuned on the evaluation text: the rows are
the documented default (by model type; 0.85 for ``llama``), the paper's 0.5, and Mistral's 0.8.

    .venv/bin/python benchmarks/smoothquant_smollm2.py [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import channelwise.methods.smoothquant  # noqa: F401  (registers the method)
from channelwise import Protocol, load_model, perplexity, quantize
from channelwise.methods.smoothquant import default_alpha
from channelwise.recipe import Recipe, Step, load_recipe


def with_alpha(preset: str, alpha: float) -> Recipe:
    recipe = load_recipe(preset)
    steps = (Step(method="smoothquant", args={"alpha": alpha}), Step(method="rtn"))
    return recipe.model_copy(update={"name": f"{preset} α={alpha}", "steps": steps})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()

    protocol = Protocol()
    model, tokenizer = load_model(device=args.device)
    calibration = protocol.calibration_tokens(tokenizer)
    windows = protocol.eval_tokens(tokenizer)
    default = default_alpha(model.config.model_type)
    del model

    recipes: list[Recipe] = [
        load_recipe("fp"),
        load_recipe("rtn-w8a8"),
        with_alpha("smoothquant-w8a8", 0.5),
        with_alpha("smoothquant-w8a8", 0.8),
        load_recipe("smoothquant-w8a8").model_copy(
            update={"name": f"smoothquant-w8a8 (default α={default})"}
        ),
        load_recipe("rtn-w6a6"),
        load_recipe("smoothquant-w6a6").model_copy(
            update={"name": f"smoothquant-w6a6 (default α={default})"}
        ),
    ]
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
            f"{row['recipe']:<36} {row['bits']:<6} ppl {ppl:8.3f}  Δ {row['delta_pct']:+7.2f}%  "
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
            json.dump({"device": args.device, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
