"""SmoothQuant vs RTN on the embedded SmolLM2-135M, on the project's benchmark protocol.

Calibrates on *Emma* (``Protocol().calibration_tokens``: 128 × 512 tokens), evaluates perplexity
on *Pride and Prejudice* (``Protocol().eval_tokens``: 16 × 512), all in one run so every Δ% is
against the fp perplexity of the same run. α is not tuned on the evaluation text: the rows are
the documented default (by model type; 0.85 for ``llama``), the paper's 0.5, and Mistral's 0.8.

    .venv/bin/python benchmarks/smoothquant_smollm2.py [--samples 32] [--device cuda] \
        [--json out.json]
"""

from __future__ import annotations

import common  # benchmarks/common.py: this folder is on sys.path when run as a script
from transformers import AutoConfig

import channelwise.methods.smoothquant  # noqa: F401  (registers the method)
from channelwise.methods.smoothquant import default_alpha
from channelwise.models import resolve_model
from channelwise.recipe import Recipe, Step, load_recipe


def with_alpha(preset: str, alpha: float) -> Recipe:
    recipe = load_recipe(preset)
    steps = (Step(method="smoothquant", args={"alpha": alpha}), Step(method="rtn"))
    return recipe.model_copy(update={"name": f"{preset} α={alpha}", "steps": steps})


def renamed(preset: str, name: str) -> Recipe:
    return load_recipe(preset).model_copy(update={"name": name})


def main() -> None:
    args = common.parser(__doc__).parse_args()
    default = default_alpha(AutoConfig.from_pretrained(resolve_model()).model_type)
    recipes = [
        "fp",
        "rtn-w8a8",
        with_alpha("smoothquant-w8a8", 0.5),
        with_alpha("smoothquant-w8a8", 0.8),
        renamed("smoothquant-w8a8", f"smoothquant-w8a8 (default α={default})"),
        "rtn-w6a6",
        renamed("smoothquant-w6a6", f"smoothquant-w6a6 (default α={default})"),
    ]
    common.main(args, recipes)


if __name__ == "__main__":
    main()
