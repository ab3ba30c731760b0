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

import common  # benchmarks/common.py: this folder is on sys.path when run as a script

import channelwise.methods.dgq  # noqa: F401  (registers the method)

RECIPES = ("fp", "rtn-w4a8-g64", "dgq-w4a8")


def main() -> None:
    args = common.parser(__doc__, RECIPES).parse_args()
    common.main(args, common.recipe_names(args))


if __name__ == "__main__":
    main()
