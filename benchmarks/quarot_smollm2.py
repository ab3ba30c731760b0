"""QuaRot vs RTN at W4A4 on the embedded SmolLM2-135M, on the project's benchmark protocol.

Calibrates on *Emma* (``Protocol().calibration_tokens``: 128 × 512 tokens; ``--samples N`` keeps
the first N), evaluates perplexity on *Pride and Prejudice* (``Protocol().eval_tokens``:
16 × 512), all in one run so every Δ% is against the fp perplexity of the same run. Nothing is
tuned on the evaluation text: the presets carry the paper's settings (seed 0).

    .venv/bin/python benchmarks/quarot_smollm2.py [--samples 32] [--recipes fp,quarot-rtn-w4a4]
        [--device cuda] [--json out.json]
"""

from __future__ import annotations

import common  # benchmarks/common.py: this folder is on sys.path when run as a script

RECIPES = ("fp", "rtn-w4a4", "quarot-rtn-w4a4", "quarot-w4a4")


def main() -> None:
    args = common.parser(__doc__, RECIPES).parse_args()
    common.main(args, common.recipe_names(args))


if __name__ == "__main__":
    main()
