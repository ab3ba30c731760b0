"""GPTQ against RTN on the embedded SmolLM2-135M-Instruct, on the benchmark protocol.

Calibration: ``Protocol().calibration_tokens`` (Emma, 128 × 512); evaluation: Pride and Prejudice,
16 windows × 512. Every row starts from a fresh copy of the model. Prints a table::

    .venv/bin/python benchmarks/gptq_smollm2.py                     # fp, RTN, GPTQ preset
    .venv/bin/python benchmarks/gptq_smollm2.py --variants seq,1pass,actorder,actorder-static
    .venv/bin/python benchmarks/gptq_smollm2.py --bits 3 --device cuda
    .venv/bin/python benchmarks/gptq_smollm2.py --threads 1   # when another job shares the CPU
"""

from __future__ import annotations

import common  # benchmarks/common.py: this folder is on sys.path when run as a script

import channelwise.methods.gptq  # noqa: F401  (registers 'gptq')
from channelwise.recipe import Recipe, Step, load_recipe

VARIANTS = {  # name suffix → gptq step args
    "seq": {},
    "1pass": {"true_sequential": False},
    "actorder": {"act_order": True},
    "actorder-static": {"act_order": True, "static_groups": True},
}


def gptq_recipe(bits: int, variant: str) -> Recipe:
    recipe = load_recipe(f"gptq-w{bits}a16-g64")
    name = recipe.name if variant == "seq" else f"{recipe.name}-{variant}"
    steps = (Step(method="gptq", args=VARIANTS[variant]),)
    return recipe.model_copy(update={"name": name, "steps": steps})


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--bits", type=int, default=4, choices=(3, 4))
    parser.add_argument(
        "--variants",
        default="seq",
        help=f"comma-separated GPTQ variants among {', '.join(VARIANTS)} (seq: the preset)",
    )
    args = parser.parse_args()
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; choose among {', '.join(VARIANTS)}")
    recipes = ["fp", f"rtn-w{args.bits}a16-g64"] + [gptq_recipe(args.bits, v) for v in variants]
    common.main(args, recipes)


if __name__ == "__main__":
    main()
