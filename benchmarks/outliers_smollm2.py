"""Outlier methods (OS+, OutlierTune) vs RTN and SmoothQuant on the embedded SmolLM2-135M.

The project's benchmark protocol: calibration on *Emma* (``Protocol().calibration_tokens``:
128 × 512 tokens), perplexity on *Pride and Prejudice* (``Protocol().eval_tokens``: 16 × 512), all
in one run so every Δ% is against the fp perplexity of the same run. Every method runs with its
documented defaults (presets as shipped); nothing is tuned on the evaluation text.

    .venv/bin/python benchmarks/outliers_smollm2.py [--samples 32] [--recipes fp,osplus-w6a6]
        [--device cuda] [--json out.json]
"""

from __future__ import annotations

import common  # benchmarks/common.py: this folder is on sys.path when run as a script

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
    args = common.parser(__doc__, RECIPES).parse_args()
    common.main(args, common.recipe_names(args))


if __name__ == "__main__":
    main()
