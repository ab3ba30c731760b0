"""llm-compressor's round-to-nearest against channelwise's, on the benchmark, in one run.

llm-compressor (vLLM's quantization toolkit) quantizes the embedded SmolLM2-135M checkpoint with
its ``QuantizationModifier`` (no calibration data: round-to-nearest weights, dynamic per-token
activations) and saves it compressed (compressed-tensors, the layout vLLM loads). channelwise
then loads each saved folder (``channelwise eval DIR`` does the same) and scores it on the
protocol's 16 × 512 *Pride and Prejudice* windows, beside fp and channelwise's own presets of
the same schemes, all in this process:

- W4A16 g64: int4 asymmetric weights in groups of 64 along the input (``rtn-w4a16-g64``);
- W8A8: int8 symmetric weights per output channel, int8 symmetric dynamic per-token inputs
  (``rtn-w8a8``).

The LM head stays in float in both. llm-compressor is not a project dependency (it pins
transformers ≤ 5.17): install it in its own venv and point ``--llmc-python`` at it; this script
runs itself there in ``--export`` mode (``-P``: without this folder on its path, whose
``kernels.py`` would shadow the package transformers imports by that name)::

    python3.11 -m venv /tmp/lcvenv
    /tmp/lcvenv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1 transformers==5.17.0
    .venv/bin/python benchmarks/llmcompressor_smollm2.py --llmc-python /tmp/lcvenv/bin/python \\
        --threads 1 --json docs/runs/cpu-llmcompressor.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: scheme → (llm-compressor weight args, its input-activation args or None, our preset)
SCHEMES = {
    "W4A16 g64": (
        {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64},
        None,
        "rtn-w4a16-g64",
    ),
    "W8A8": (
        {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
        {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
        "rtn-w8a8",
    ),
}


def export(scheme: str, source: str, out: str, threads: int) -> None:
    """Quantize ``source`` with llm-compressor and save it compressed to ``out`` (llmc venv)."""
    import llmcompressor
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    weights, inputs, _ = SCHEMES[scheme]
    group = {"targets": ["Linear"], "weights": weights}
    if inputs is not None:
        group["input_activations"] = inputs
    modifier = QuantizationModifier(config_groups={"group_0": group}, ignore=["lm_head"])
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    oneshot(model=model, recipe=modifier)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    print(json.dumps({"llmcompressor": llmcompressor.__version__}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llmc-python", required=True, help="python of a venv with llmcompressor")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--windows", type=int, help="fewer evaluation windows (smoke checks only)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()

    import common  # benchmarks/common.py: this folder is on sys.path when run as a script
    import torch

    from channelwise import load_model, perplexity, quantize
    from channelwise.models import resolve_model
    from channelwise.protocol import Protocol

    torch.set_num_threads(args.threads)
    protocol = Protocol().with_(windows=args.windows)
    source = str(resolve_model(None))
    model, tokenizer = load_model(None, device="cpu")
    windows = protocol.eval_tokens(tokenizer)
    fp = perplexity(model, windows, progress=False)
    print(f"fp {fp:.3f}", flush=True)
    rows, version = [], None
    for scheme, (_, _, preset) in SCHEMES.items():
        model, _ = load_model(None, device="cpu")
        quantize(model, preset, None, progress=False)
        ours = perplexity(model, windows, progress=False)
        with tempfile.TemporaryDirectory() as work:
            folder = Path(work) / "llmc"
            start = time.perf_counter()
            cmd = [args.llmc_python, "-P", __file__, "--export", scheme, source, str(folder),
                   str(args.threads)]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"llm-compressor export of {scheme} failed:\n{done.stderr[-3000:]}")
            version = json.loads(done.stdout.strip().splitlines()[-1])["llmcompressor"]
            seconds = time.perf_counter() - start
            theirs = perplexity(load_model(folder, device="cpu")[0], windows, progress=False)
            size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        row = {"scheme": scheme, "channelwise_preset": preset, "channelwise": ours,
               "llmcompressor": theirs, "llmcompressor_bytes": size,
               "llmcompressor_export_s": seconds}  # fmt: skip
        rows.append(row)
        print(f"{scheme}: channelwise {preset} {ours:.3f}, llm-compressor {theirs:.3f}", flush=True)
    if args.json:
        common.write_raw(args.json, rows, fp=fp, windows=protocol.windows, llmcompressor=version,
                         command="python benchmarks/llmcompressor_smollm2.py")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--export":
        export(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        main()
