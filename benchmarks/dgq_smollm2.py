"""DGQ W4A8 vs RTN W4A8 (groups of 64) on the embedded SmolLM2-135M, on the benchmark protocol.

Calibrates on *Emma* (``Protocol().calibration_tokens``: 128 × 512 tokens; ``--samples N`` keeps
the first N), evaluates perplexity on *Pride and Prejudice* (``Protocol().eval_tokens``: 16 × 512),
all in one run so every Δ% is against the fp perplexity of the same run. Nothing is tuned on the
evaluation text. Rows: ``fp``, ``rtn-w4a8-g64`` (INT4 asym g64 weights, dynamic per-token INT8
activations) and ``dgq-w4a8`` (DGQ weights, static per-tensor INT8 activations). ``dgq-w4a16``
is built here, not a preset: ``dgq-w4a8`` without its activation quantizer (DGQ's weights alone,
to set against ``rtn-w4a16-g64``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dgq_smollm2.py [--samples 32] \
        [--recipes fp,rtn-w4a8-g64,dgq-w4a8] [--device cuda] [--json out.json]
    .venv/bin/python benchmarks/dgq_smollm2.py --samples 32 \
        --recipes fp,rtn-w4a16-g64,dgq-w4a16,dgq-w4a8
"""

from __future__ import annotations

import common  # benchmarks/common.py: this folder is on sys.path when run as a script

import channelwise.methods.dgq  # noqa: F401  (registers the method)
from channelwise.recipe import Recipe

RECIPES = ("fp", "rtn-w4a8-g64", "dgq-w4a8")


def weights_only() -> Recipe:
    """``dgq-w4a8`` with float activations."""
    return common.variant("dgq-w4a8", "dgq-w4a16", "DGQ weights alone", activations=None)


def main() -> None:
    args = common.parser(__doc__, RECIPES).parse_args()
    names = common.recipe_names(args)
    common.main(args, [weights_only() if name == "dgq-w4a16" else name for name in names])


if __name__ == "__main__":
    main()
