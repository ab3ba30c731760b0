"""CHESS, CATS and TEAL activation sparsity on the embedded SmolLM2-135M (benchmark protocol).

Each method at sparsity 0.3 / 0.5 / 0.7 (CHESS with its attention-input thresholds, "CHESS w/";
``--no-attention`` for FFN only; TEAL greedy-allocated, and uniform with ``--teal-uniform``), and
CHESS and TEAL 50% composed with RTN INT4 g64 weights beside RTN alone, all in one run so every
Δ% is against the fp perplexity of the same run. Thresholds are calibrated on *Emma* only.
``--methods`` picks among cats, chess, teal, teal-uniform. Raw rows: ``--json
docs/runs/sparsity-smollm2.json``.

    .venv/bin/python benchmarks/sparsity_smollm2.py [--samples 32] [--levels 0.3,0.5,0.7]
        [--methods cats,chess,teal] [--greedy-levels 0.5] [--no-attention] [--no-w4]
        [--device cuda] [--json out.json]
"""

from __future__ import annotations

import common  # benchmarks/common.py: this folder is on sys.path when run as a script

from channelwise.recipe import Recipe, load_recipe

METHODS = "cats,chess,teal,teal-uniform"
W4 = {"bits": 4, "symmetric": False, "granularity": "group", "group_size": 64}


def sparsity_recipe(method: str, level: float, attention: bool, weights: dict | None = None):
    tag = "" if method != "chess" or attention else "-ffn"
    name = f"{method}{tag}-{round(level * 100)}" + ("-w4a16-g64" if weights else "")
    args = {"sparsity": level} | ({"attention": attention} if method == "chess" else {})
    if method == "teal-uniform":
        method, args = "teal", args | {"allocation": "uniform"}
    steps = [{"method": method, "args": args}] + ([{"method": "rtn"}] if weights else [])
    return Recipe.from_dict({"name": name, "weights": weights, "steps": steps})


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--levels", default="0.3,0.5,0.7", help="comma-separated sparsities")
    p.add_argument("--no-attention", action="store_true", help="CHESS on the FFN only")
    p.add_argument("--no-w4", action="store_true", help="skip the RTN W4 g64 rows")
    p.add_argument("--methods", default="cats,chess,teal", help="comma-separated: " + METHODS)
    p.add_argument(
        "--greedy-levels", help="TEAL greedy at these sparsities only (its search is slow on a CPU)"
    )
    args = p.parse_args()
    levels = [float(level) for level in args.levels.split(",")]
    greedy = [float(x) for x in args.greedy_levels.split(",")] if args.greedy_levels else levels
    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS.split(",")):
        p.error(f"unknown method(s) {sorted(unknown)}; choose from {METHODS}")
    attention = not args.no_attention
    recipes = [load_recipe("fp")]
    recipes += [
        sparsity_recipe(m, level, attention)
        for m in methods
        for level in (greedy if m == "teal" else levels)
    ]
    if not args.no_w4:
        recipes.append(load_recipe("rtn-w4a16-g64"))
        recipes += [sparsity_recipe(m, 0.5, attention, W4) for m in methods if m != "cats"]
    common.main(args, recipes)


if __name__ == "__main__":
    main()
