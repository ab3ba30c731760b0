"""GPTQ against RTN on the embedded SmolLM2-135M-Instruct, on the benchmark protocol.

Calibration: ``Protocol().calibration_tokens`` (Emma, 128 × 512); evaluation: Pride and Prejudice,
16 windows × 512. Every row starts from a fresh copy of the model. Prints a table::

    .venv/bin/python benchmarks/gptq_smollm2.py                     # fp, RTN, GPTQ preset
    .venv/bin/python benchmarks/gptq_smollm2.py --variants seq,1pass,actorder,actorder-static
    .venv/bin/python benchmarks/gptq_smollm2.py --bits 3 --device cuda
    .venv/bin/python benchmarks/gptq_smollm2.py --threads 1   # when another job shares the CPU
"""

from __future__ import annotations

import argparse
import time

import torch

import channelwise as cw
import channelwise.methods.gptq  # noqa: F401  (registers 'gptq')
from channelwise.recipe import Step, load_recipe

VARIANTS = {  # name suffix → gptq step args
    "seq": {},
    "1pass": {"true_sequential": False},
    "actorder": {"act_order": True},
    "actorder-static": {"act_order": True, "static_groups": True},
}


def gptq_recipe(bits: int, variant: str) -> cw.Recipe:
    recipe = load_recipe(f"gptq-w{bits}a16-g64")
    name = recipe.name if variant == "seq" else f"{recipe.name}-{variant}"
    steps = (Step(method="gptq", args=VARIANTS[variant]),)
    return recipe.model_copy(update={"name": name, "steps": steps})


def run(recipe, calibration, windows, device: str) -> tuple[float, float]:
    """Perplexity and calibration seconds of ``recipe`` on a fresh model."""
    model, _ = cw.load_model(device=device)
    seconds = 0.0
    if recipe != "fp":
        result = cw.quantize(model, recipe, calibration, progress=False)
        seconds = result.calib_seconds
    return cw.perplexity(model, windows, progress=False), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4, choices=(3, 4))
    parser.add_argument(
        "--variants",
        default="seq",
        help=f"comma-separated GPTQ variants among {', '.join(VARIANTS)} (seq: the preset)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch threads (1 on a shared machine)")
    parser.add_argument("--calib-samples", type=int, default=128, help="fewer for a quick look")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    protocol = cw.Protocol(calib_samples=args.calib_samples)
    _, tokenizer = cw.load_model(device="cpu")
    windows = protocol.eval_tokens(tokenizer)
    calibration = protocol.calibration_tokens(tokenizer)
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; choose among {', '.join(VARIANTS)}")
    recipes = ["fp", f"rtn-w{args.bits}a16-g64"] + [gptq_recipe(args.bits, v) for v in variants]

    print(f"torch threads: {torch.get_num_threads()}, device: {args.device}, "
          f"calibration {tuple(calibration.shape)}, eval {tuple(windows.shape)}")  # fmt: skip
    print(f"{'recipe':<34} {'ppl':>8} {'calib s':>9} {'wall s':>8}", flush=True)
    for recipe in recipes:
        start = time.perf_counter()
        ppl, seconds = run(recipe, calibration, windows, args.device)
        name = recipe if isinstance(recipe, str) else recipe.name
        wall = time.perf_counter() - start
        print(f"{name:<34} {ppl:>8.3f} {seconds:>9.1f} {wall:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
