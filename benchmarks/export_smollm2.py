"""compressed-tensors exports of the embedded SmolLM2-135M: weights and perplexity against ours.

Each recipe is calibrated once (Emma, ``--samples``), scored in memory (fake quantization),
packed and scored on the packed modules, then exported with ``--format compressed-tensors``
(the layout vLLM loads): the package decompresses the export and every weight is compared with
ours (``worst_diff``), and the folder is scored as ``channelwise eval DIR`` loads it (through
transformers and the package). Same 16 × 512 *Pride and Prejudice* windows, fp in the same
run::

    .venv/bin/python benchmarks/export_smollm2.py --threads 1 \
        --json docs/runs/cpu-compressed-tensors.json
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import common  # benchmarks/common.py: this folder is on sys.path when run as a script

from channelwise import quantize
from channelwise.compress import needs_calibration
from channelwise.deploy import pack_model
from channelwise.deploy.compressed_tensors import (
    export_compressed_tensors,
    verify_compressed_tensors,
)
from channelwise.models import load_model
from channelwise.recipe import load_recipe

RECIPES = ("rtn-w4a16-g64", "gptq-w4a16-g64", "rtn-w8a8")


def main() -> None:
    args = common.parser(__doc__, RECIPES).parse_args()
    protocol, tokenizer, ppl, fp = common.fp_baseline(args)
    calibration = None
    rows = []
    for name in common.recipe_names(args):
        recipe = load_recipe(name)
        model, _ = load_model(device=args.device)
        if calibration is None and needs_calibration(recipe):
            calibration = protocol.calibration_tokens(tokenizer)
        result = quantize(model, recipe, calibration, progress=False)
        row = {"recipe": name, "calib_s": result.calib_seconds, "fake": ppl(model)}
        pack_model(model)
        row["packed"] = ppl(model)
        with tempfile.TemporaryDirectory() as work:
            folder = export_compressed_tensors(model, tokenizer, Path(work) / "export")
            row["worst_diff"] = verify_compressed_tensors(folder, model)
            row["export_bytes"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            row["export"] = ppl(load_model(folder, device=args.device)[0])
        rows.append(row)
        print(
            f"{name:18s} fake {row['fake']:.3f}  packed {row['packed']:.3f}  export "
            f"{row['export']:.3f} ({row['export_bytes'] / 1e6:.1f} MB, weights differ by at most "
            f"{row['worst_diff']:g})",
            flush=True,
        )
    if args.json:
        common.write_raw(args.json, rows, fp=fp, samples=args.samples, windows=protocol.windows,
                         command="python benchmarks/export_smollm2.py")  # fmt: skip


if __name__ == "__main__":
    main()
