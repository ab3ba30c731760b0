"""Packed checkpoints against fake quantization on the embedded SmolLM2-135M: perplexity and bytes.

Each recipe is calibrated once (Emma, ``--samples``) and then measured four ways on the
protocol's 16 × 512 Pride and Prejudice windows, beside the float model of the same run:

- ``fake``: the quantized model in memory (fake quantization, float GEMMs);
- ``fake folder``: that model saved with ``--format fake`` and loaded back;
- ``packed``: the model packed (``pack_model``), saved, loaded back, on the integer kernels;
- ``packed reference``: the same folder with ``use_kernels(False)`` (de-quantize, float GEMM).

Bytes: each folder's safetensors files, and the packed folder's block linears alone (every tensor
under ``model.layers.`` but the norms). A recipe name ending in ``+f16`` saves the packed folder
with the unquantized float tensors in float16 (``channelwise quantize --float-dtype float16``)::

    .venv/bin/python benchmarks/packed_smollm2.py --recipes rtn-w4a16-g64,rtn-w4a16-g64+f16,\
rtn-w4a16-g64-e8,rtn-w8a8,outliertune-w8a8,dgq-w4a8 --json docs/runs/cpu-packed.json
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import common  # benchmarks/common.py: this folder is on sys.path when run as a script
import torch
from safetensors import safe_open

from channelwise import quantize, save_quantized
from channelwise.compress import needs_calibration
from channelwise.deploy import pack_model
from channelwise.deploy.kernel_call import use_kernels
from channelwise.deploy.packed import round_float_tensors_
from channelwise.models import load_model
from channelwise.recipe import load_recipe

RECIPES = ("rtn-w4a16-g64", "rtn-w8a8")


def folder_bytes(folder: Path) -> tuple[int, int]:
    """All safetensors bytes, and those of the block linears (``model.layers.*``, norms aside)."""
    total = linears = 0
    for file in folder.glob("*.safetensors"):
        total += file.stat().st_size
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key.startswith("model.layers.") and "norm" not in key:
                    linears += f.get_tensor(key).nbytes
    return total, linears


def main() -> None:
    args = common.parser(__doc__, RECIPES).parse_args()
    protocol, tokenizer, ppl, fp = common.fp_baseline(args)
    calibration = None
    rows = []
    for name in common.recipe_names(args):
        recipe = load_recipe(name.removesuffix("+f16"))
        model, _ = load_model(device=args.device)
        if calibration is None and needs_calibration(recipe):
            calibration = protocol.calibration_tokens(tokenizer)
        result = quantize(model, recipe, calibration, progress=False)
        row = {"recipe": name, "calib_s": result.calib_seconds, "fake": ppl(model)}
        with tempfile.TemporaryDirectory() as work:
            fake_dir = save_quantized(model, tokenizer, Path(work) / "fake")
            row["fake_folder_bytes"] = folder_bytes(fake_dir)[0]
            row["fake folder"] = ppl(load_model(fake_dir, device=args.device)[0])
            pack_model(model)
            if name.endswith("+f16"):
                round_float_tensors_(model, torch.float16)
            packed_dir = save_quantized(model, tokenizer, Path(work) / "packed")
            row["packed_bytes"], row["packed_linear_bytes"] = folder_bytes(packed_dir)
            del model
            packed = load_model(packed_dir, device=args.device)[0]
            row["packed"] = ppl(packed)
            previous = use_kernels(False)
            try:
                row["packed reference"] = ppl(packed)
            finally:
                use_kernels(previous)
        rows.append(row)
        print(
            f"{name:24s} fake {row['fake']:.3f}  fake folder {row['fake folder']:.3f}  packed "
            f"{row['packed']:.3f}  reference {row['packed reference']:.3f}  files "
            f"{row['fake_folder_bytes'] / 1e6:.1f} / {row['packed_bytes'] / 1e6:.1f} MB  "
            f"block linears {row['packed_linear_bytes'] / 1e6:.1f} MB  "
            f"calib {row['calib_s']:.0f} s",
            flush=True,
        )
    if args.json:
        common.write_raw(args.json, rows, fp=fp, samples=protocol.calib_samples,
                         windows=protocol.windows)  # fmt: skip


if __name__ == "__main__":
    main()
