"""SmolLM2-135M through the lm-evaluation-harness bridge: the local Austen tasks, fp and presets.

For each recipe (fp first) a fresh SmolLM2 is compressed, calibrated on the protocol's Emma
samples (``--samples``, default 32), packed when its weights are quantized, and run through
:func:`channelwise.evaluate.harness.run_tasks` on ``austen_pride_perplexity`` (word perplexity of
256-word passages of *Pride and Prejudice*) and ``austen_pride_next_word`` (4-way next word,
accuracy), the first ``--limit`` documents of each (all by default). Every figure is from this
run; the ratio column compares with fp of the same run.

    .venv/bin/python benchmarks/harness_smollm2.py [--recipes fp,rtn-w8a16,...] [--samples 32]
        [--limit N] [--threads 2] [--json docs/runs/harness-smollm2.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from channelwise import load_model, quantize
from channelwise.compress import needs_calibration
from channelwise.deploy import pack_model
from channelwise.evaluate.harness import NEXT_WORD_TASK, PERPLEXITY_TASK, run_tasks
from channelwise.methods.registry import quantizes_weights
from channelwise.paths import write_atomic
from channelwise.protocol import Protocol
from channelwise.recipe import load_recipe

DEFAULT = "fp,rtn-w8a16,rtn-w4a16-g64,gptq-w4a16-g64,rtn-w3a16-g64,gptq-w3a16-g64"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default=DEFAULT)
    p.add_argument("--samples", type=int, default=32, help="calibration samples (of 512 tokens)")
    p.add_argument("--limit", type=int, help="first N documents of each task (default: all)")
    p.add_argument("--threads", type=int)
    p.add_argument("--json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    if names[0] != "fp":
        names.insert(0, "fp")
    protocol = Protocol().with_(calib_samples=args.samples)
    rows = {}
    for name in names:
        model, tokenizer = load_model(device="cpu")
        recipe = load_recipe(name)
        start = time.perf_counter()
        calibration = protocol.calibration_tokens(tokenizer) if needs_calibration(recipe) else None
        quantize(model, recipe, calibration, progress=False)
        if any(quantizes_weights(step.method) for step in recipe.steps):
            pack_model(model)
        calib_s = time.perf_counter() - start
        start = time.perf_counter()
        results = run_tasks(model, tokenizer, [PERPLEXITY_TASK, NEXT_WORD_TASK], limit=args.limit)
        rows[name] = {
            "word_perplexity": results[PERPLEXITY_TASK]["word_perplexity"],
            "bits_per_byte": results[PERPLEXITY_TASK]["bits_per_byte"],
            "next_word_acc": results[NEXT_WORD_TASK]["acc"],
            "calib_s": calib_s,
            "eval_s": time.perf_counter() - start,
        }
        fp = rows["fp"]["word_perplexity"]
        row = rows[name]
        ppl, acc = row["word_perplexity"], 100 * row["next_word_acc"]
        print(
            f"{name:<24} word ppl {ppl:8.3f} ({ppl / fp:5.3f}× fp)  bits/byte "
            f"{row['bits_per_byte']:.4f}  next-word acc {acc:5.1f}%  calib {calib_s:6.1f}s  "
            f"eval {row['eval_s']:6.1f}s",
            flush=True,
        )
    print("\n| recipe | word perplexity | × fp | bits/byte | next-word acc % |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        ratio = row["word_perplexity"] / rows["fp"]["word_perplexity"]
        print(
            f"| {name} | {row['word_perplexity']:.3f} | {ratio:.3f} | {row['bits_per_byte']:.4f} "
            f"| {100 * row['next_word_acc']:.1f} |"
        )
    if args.json:
        meta = {
            "torch": torch.__version__,
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "calib_samples": args.samples,
            "limit": args.limit,
        }
        write_atomic(args.json, json.dumps({"_meta": meta, **rows}, indent=2))


if __name__ == "__main__":
    main()
