"""AWQ and SmoothQuant+ vs RTN and GPTQ on the embedded SmolLM2-135M, on the benchmark protocol.

Calibrates on *Emma* (``Protocol().calibration_tokens``: 128 × 512 tokens; ``--samples N`` keeps
the first N), evaluates perplexity on *Pride and Prejudice* (``Protocol().eval_tokens``: 16 × 512),
all in one run so every Δ% is against the fp perplexity of the same run. Nothing is tuned on the
evaluation text: AWQ and SmoothQuant+ search on calibration tokens only.

    .venv/bin/python benchmarks/awq_smollm2.py [--samples 32] [--recipes fp,awq-w4a16-g64]
        [--device cuda] [--json out.json]
"""

from __future__ import annotations

import common  # benchmarks/common.py: this folder is on sys.path when run as a script

RECIPES = (
    "fp",
    "rtn-w4a16-g64",
    "gptq-w4a16-g64",
    "awq-w4a16-g64",
    "awq-gptq-w4a16-g64",
    "smoothquant_plus-w4a16-g64",
    "smoothquant_plus-gptq-w4a16-g64",
)


def main() -> None:
    args = common.parser(__doc__, RECIPES).parse_args()
    common.main(args, common.recipe_names(args))


if __name__ == "__main__":
    main()
