"""GGUF exports run by llama.cpp: perplexity against channelwise's own evaluation of the recipe.

For each recipe: quantize SmolLM2-135M, score the protocol's evaluation windows (Pride and
Prejudice, 16 × 512 tokens from token 5000) with our model (as ``channelwise eval`` does), pack
and export it with ``--format gguf``, then score the same token ids with llama.cpp's logits
(``llama_cpp.Llama(..., logits_all=True)``, each window evaluated on its own from an empty
context, no BOS added: exactly our windows). Also scored by llama.cpp: the embedded GGUF the
model was loaded from (our ``fp`` model is its de-quantized weights), as a check of the loop.

llama-cpp-python is not a project dependency: build it into its own venv and point
``--llama-python`` at that interpreter; this script runs itself there in ``--score`` mode,
which needs only numpy and llama_cpp::

    python3.11 -m venv /tmp/lcpvenv
    CMAKE_ARGS="-DGGML_NATIVE=ON" /tmp/lcpvenv/bin/pip install llama-cpp-python
    .venv/bin/python benchmarks/gguf_llamacpp.py --llama-python /tmp/lcpvenv/bin/python

llama.cpp computes in its own kernels (it multiplies the Q4/Q8 blocks against activations it
quantizes to 8 bits, ``Q8_0``/``Q8_1`` dot products, with float16 KV cache by default), so its
perplexity is expected to differ slightly from ours, which de-quantizes to float32.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_RECIPES = "rtn-w4a16-q4_0,rtn-w4a16-q4_1,rtn-w8a16-q8_0,rtn-w4a16-q4_1-e8"
#: Recipes that are not presets, by name: the embedded file's own layout (Q4_1 linears, a Q8_0
#: token embedding and the LM head tied to it).
VARIANTS = {
    "rtn-w4a16-q4_1-e8": dict(
        preset="rtn-w4a16-q4_1",
        description="rtn-w4a16-q4_1 plus the token embedding in Q8_0 (the embedded file's layout)",
        embedding={"bits": 8, "symmetric": True, "granularity": "group", "group_size": 32,
                   "scale_dtype": "float16"},
    ),
}  # fmt: skip


def recipe_named(name: str):
    """A preset, or one of :data:`VARIANTS`."""
    if name in VARIANTS:
        from common import variant  # benchmarks/common.py: this folder is on sys.path

        spec = dict(VARIANTS[name])
        return variant(spec.pop("preset"), name, spec.pop("description"), **spec)
    from channelwise import load_recipe

    return load_recipe(name)


def score(gguf_file: str, windows_file: str, threads: int) -> list[float]:
    """Summed next-token NLL per window, from llama.cpp's logits (runs in the llama venv)."""
    import llama_cpp.llama_cpp as lib
    import numpy as np
    from llama_cpp import Llama

    # llama.cpp's AMX weight repacking (an "extra buffer type", picked on Sapphire Rapids)
    # crashed in ggml_backend_amx_mul_mat here (llama-cpp-python 0.3.36); its plain CPU path
    # takes the same GGUF blocks. The Llama class does not expose the switch: patch the defaults.
    defaults = lib.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = without_extra_buffers
    windows = json.loads(Path(windows_file).read_text())
    seqlen = len(windows[0])
    llm = Llama(
        model_path=gguf_file,
        n_ctx=seqlen,
        n_batch=seqlen,
        n_ubatch=seqlen,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        verbose=False,
    )
    totals = []
    for window in windows:
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: seqlen - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        target = logits[np.arange(seqlen - 1), window[1:]]
        totals.append(float((log_z - target).sum()))
    return totals


def llama_ppl(python: str, gguf_file: Path, windows_file: Path, threads: int) -> float:
    cmd = [python, __file__, "--score", str(gguf_file), str(windows_file), str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    totals = json.loads(out.strip().splitlines()[-1])
    windows = json.loads(windows_file.read_text())
    return math.exp(sum(totals) / (len(windows) * (len(windows[0]) - 1)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-python", required=True, help="python of a venv with llama_cpp")
    p.add_argument("--recipes", default=DEFAULT_RECIPES, help="comma-separated presets")
    p.add_argument("--threads", type=int, default=1, help="threads for torch and llama.cpp")
    p.add_argument("--windows", type=int, help="fewer evaluation windows (smoke checks only)")
    p.add_argument("--out", help="keep the .gguf files here (default: a temporary folder)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()

    import torch

    from channelwise import load_model, perplexity, quantize
    from channelwise.compress import needs_calibration
    from channelwise.deploy import pack_model
    from channelwise.deploy.gguf import export_gguf, verify_gguf
    from channelwise.models import embedded_gguf
    from channelwise.protocol import Protocol

    torch.set_num_threads(args.threads)
    protocol = Protocol().with_(windows=args.windows)
    folder = Path(args.out or tempfile.mkdtemp(prefix="gguf-llamacpp-"))
    folder.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(None, device="cpu")
    windows = protocol.eval_tokens(tokenizer)
    windows_file = folder / "windows.json"
    windows_file.write_text(json.dumps(windows.tolist()))
    source = embedded_gguf()

    rows = []
    start = time.perf_counter()
    ours = perplexity(model, windows, progress=False)
    theirs = llama_ppl(args.llama_python, source, windows_file, args.threads)
    rows.append(
        {
            "recipe": "fp (embedded Q4_1 GGUF)",
            "ours": ours,
            "llama.cpp": theirs,
            "file_mb": source.stat().st_size / 1e6,
            "max_weight_diff": None,
        }
    )
    print(
        f"fp: ours {ours:.4f}, llama.cpp {theirs:.4f} ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    for name in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        start = time.perf_counter()
        recipe = recipe_named(name)
        model, _ = load_model(None, device="cpu")
        calibration = protocol.calibration_tokens(tokenizer) if needs_calibration(recipe) else None
        quantize(model, recipe, calibration, progress=False)
        ours = perplexity(model, windows, progress=False)  # as `channelwise eval` of the recipe
        pack_model(model)
        path = export_gguf(model, folder, tokenizer, tokenizer_gguf=source, force=True)
        worst = verify_gguf(path, model)
        theirs = llama_ppl(args.llama_python, path, windows_file, args.threads)
        rows.append(
            {
                "recipe": name,
                "ours": ours,
                "llama.cpp": theirs,
                "file_mb": path.stat().st_size / 1e6,
                "max_weight_diff": worst,
            }
        )
        print(
            f"{name}: ours {ours:.4f}, llama.cpp {theirs:.4f}, weights read back differ by "
            f"{worst:g} ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )

    print(
        f"\n{protocol.eval_data}, {protocol.windows}×{protocol.seqlen} tokens from "
        f"{protocol.start}; llama.cpp {args.llama_python}\n"
    )
    print("| recipe | channelwise ppl | llama.cpp ppl | Δ | .gguf MB |")
    print("|---|---|---|---|---|")
    for row in rows:
        delta = 100 * (row["llama.cpp"] / row["ours"] - 1)
        print(
            f"| {row['recipe']} | {row['ours']:.3f} | {row['llama.cpp']:.3f} | "
            f"{delta:+.2f}% | {row['file_mb']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--score":
        print(json.dumps(score(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    else:
        main()
