"""Compressed KV caches on the embedded SmolLM2: greedy generation through each preset's cache,
the bytes the cache really holds afterwards against a float16 cache of the same tokens, and a
sample of the text (not a test).

The prompt is the chat-formatted question below; generation is greedy, ``--new-tokens`` long
(the issue's 2,048 by default; ``eos`` is ignored so every preset stores the same number of
tokens). The bytes are ``CompressedCache.nbytes()``: packed codes, float16 scales/minimums,
float windows and sinks — every tensor the cache holds. ``channelwise compare`` reports the same
ratio from a chunked prefill of the evaluation text; this script checks it against a real
``generate``.

    python benchmarks/kv_cache.py --recipes kivi-kv4,kivi-kv2 --new-tokens 2048
    python benchmarks/kv_cache.py --new-tokens 64 --json results/kv_generate.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import DynamicCache

from channelwise import Protocol, load_model, quantize
from channelwise.kvcache import make_cache
from channelwise.kvcache.evaluate import cache_kwarg
from channelwise.recipe import load_recipe, preset_names
from channelwise.report import write_atomic

PROMPT = "Who is Mr. Knightley in Jane Austen's Emma? Answer in a few sentences."


def main() -> None:
    kv_presets = ["fp"] + [n for n in preset_names() if load_recipe(n).kv_cache is not None]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(kv_presets))
    parser.add_argument("--new-tokens", type=int, default=2048)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    protocol = Protocol(calib_samples=args.calib_samples)
    rows = []
    calibration = None
    for name in args.recipes.split(","):
        model, tokenizer = load_model()
        if calibration is None:
            calibration = protocol.calibration_tokens(tokenizer)
        quantize(model, name, calibration, progress=False)
        messages = [{"role": "user", "content": PROMPT}]
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        has_kv = load_recipe(name).kv_cache is not None
        cache = make_cache(model) if has_kv else DynamicCache(config=model.config)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                **{cache_kwarg(model): cache},
            )
        seconds = time.perf_counter() - start
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        held = cache.nbytes() if has_kv else None  # fp: transformers' own float cache
        row = {
            "recipe": name,
            "new_tokens": int(out.shape[1] - ids.shape[1]),
            "cached_tokens": cache.get_seq_length(),
            "kv_bytes": held,
            "ratio": held / cache.float16_nbytes() if has_kv else None,
            "seconds": seconds,
            "sample": text[:300],
        }
        rows.append(row)
        size = "float cache" if held is None else f"{held / 2**20:7.2f} MiB  {row['ratio']:.3f}×"
        print(f"{name:<14} {row['cached_tokens']:>5} tokens cached  {size}  {seconds:6.1f} s")
        print(f"    {text[:200]!r}")
    if args.json:
        write_atomic(args.json, json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
