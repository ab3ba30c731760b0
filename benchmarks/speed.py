"""Speed and size of packed models against fp32, all measured in one run (not a test).

Prefill: tokens/s of one 512-token forward as ``generate`` runs it (time to first token): the KV
cache filled, logits of the last position only (``logits_to_keep=1``); until 2026-11-26 it
computed all 512 positions' logits, which adds a float 512 × 49152 LM-head GEMM to every row.
Decode: tokens/s of greedy generation of
128 new tokens at batch 1 after a 16-token prompt (KV cache on). Each variant runs in its own
process; packed variants are quantized in another process and loaded from their checkpoint, as
a user would, so the RSS (resident after the runs) and peak RSS are the loaded model's. Every
figure is the median of ``--repeats`` runs after a warm-up, and ratios are against the fp32 row
of the same run. The torchao row needs ``pip install torchao`` (not a dependency: transformers
imports it at start-up whenever it is installed).

    python benchmarks/speed.py                      # every variant
    python benchmarks/speed.py --variants fp32,w8a8 --repeats 5 --json results/speed.json
    python benchmarks/speed.py --rounds 3   # each variant 3 times, interleaved; medians
    python benchmarks/speed.py --compile    # decode through channelwise.deploy.compile_decode
    python benchmarks/speed.py --checkpoints ckpt   # keep the packed checkpoints; reuse them
    python benchmarks/speed.py --compile --cpp-wrapper   # kernels called from generated C++

The activation-sparsity variants (``chess-50``, ``cats-50``, ``teal-50``, their ``w4a16-`` forms
and ``w4a16-e8-chess-50`` / ``w4a16-e8-teal-50`` with the 8-bit embedding/LM head) calibrate on
the protocol's Emma samples when saved (minutes on 2 cores) and are also measured with the
sparse kernels off (``decode_tok_s_dense_mlp``: same zeroing, dense products),
so the kernels' own gain is a ratio within one process.

``--compile`` runs every variant's decode (fp32's included) through the compiled static-cache loop
of :func:`channelwise.deploy.decode.compile_decode`; its compilation happens in the warm-up.
Prefill stays eager, as ``generate`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "fp32": "float32 weights (the baseline)",
    "bf16": "bfloat16 weights and activations",
    "torchao-int8-dyn": "torchao int8 dynamic activations + int8 weights (pip install torchao)",
    "w8a8": "ours: rtn-w8a8 packed (int8 codes, dynamic per-token int8 activations)",
    "w8a8-outliertune": "ours: outliertune-w8a8 packed (static per-tensor int8 activations; "
    "calibrates on the protocol's Emma samples when saved)",
    "w8a16": "ours: rtn-w8a16 packed (int8 codes, float activations)",
    "w4a16": "ours: rtn-w4a16-g64 packed (4-bit codes, two per byte, groups of 64)",
    "w4a16-f16": "ours: rtn-w4a16-g64, float tensors stored in fp16 (as the anchors ship "
    "them) and the tied embedding/LM head kept in fp16 in memory",
    "w4a16-e8": "ours: rtn-w4a16-g64-e8 (plus the tied embedding/LM head in int8 per row)",
    "chess-50": "ours: CHESS 50% activation sparsity on fp32 weights (sparse MLP kernel)",
    "cats-50": "ours: CATS 50% activation sparsity on fp32 weights (sparse MLP kernel)",
    "w4a16-chess-50": "ours: chess-50-w4a16-g64 packed (CHESS 50% + 4-bit codes, groups of 64)",
    "teal-50": "ours: TEAL 50% (every linear's input) on fp32 weights (sparse-input kernel)",
    "w4a16-teal-50": "ours: teal-50-w4a16-g64 packed (TEAL 50% + 4-bit codes, groups of 64)",
    "w4a16-e8-chess-50": "ours: chess-50-w4a16-g64 with the tied embedding/LM head in int8 per "
    "row (as w4a16-e8)",
    "w4a16-e8-teal-50": "ours: teal-50-w4a16-g64 with the tied embedding/LM head in int8 per row",
    "teal-uniform-50": "ours: TEAL 50% on every linear input, uniform levels (no greedy search)",
    "w4a16-teal-uniform-50": "ours: TEAL uniform 50% + RTN 4-bit codes, groups of 64, packed",
}
EMBEDDING_8BIT = {"bits": 8, "symmetric": True, "granularity": "channel"}  # as rtn-w4a16-g64-e8
PRESETS = {
    "w8a8": "rtn-w8a8",
    "w8a8-outliertune": "outliertune-w8a8",
    "w8a16": "rtn-w8a16",
    "w4a16": "rtn-w4a16-g64",
    "w4a16-f16": "rtn-w4a16-g64",
    "w4a16-e8": "rtn-w4a16-g64-e8",
    "chess-50": "chess-50",
    "cats-50": "cats-50",
    "w4a16-chess-50": "chess-50-w4a16-g64",
    "teal-50": "teal-50",
    "w4a16-teal-50": "teal-50-w4a16-g64",
    "w4a16-e8-chess-50": {"preset": "chess-50-w4a16-g64", "embedding": EMBEDDING_8BIT},
    "w4a16-e8-teal-50": {"preset": "teal-50-w4a16-g64", "embedding": EMBEDDING_8BIT},
    "teal-uniform-50": {
        "name": "teal-uniform-50",
        "steps": [{"method": "teal", "args": {"sparsity": 0.5, "allocation": "uniform"}}],
    },
    "w4a16-teal-uniform-50": {
        "name": "teal-uniform-50-w4a16-g64",
        "weights": {"bits": 4, "symmetric": False, "granularity": "group", "group_size": 64},
        "steps": [
            {"method": "teal", "args": {"sparsity": 0.5, "allocation": "uniform"}},
            {"method": "rtn"},
        ],
    },
}


def save(variant: str, folder: str) -> None:
    """Quantize with the variant's preset, pack, and write the packed checkpoint to ``folder``."""
    import common  # benchmarks/common.py, beside this script
    import torch

    from channelwise import load_model, quantize
    from channelwise.compress import needs_calibration, save_quantized
    from channelwise.deploy import pack_model
    from channelwise.deploy.packed import round_float_tensors_
    from channelwise.protocol import Protocol
    from channelwise.recipe import Recipe, load_recipe

    model, tokenizer = load_model(device="cpu")
    preset = PRESETS[variant]
    if isinstance(preset, dict) and "preset" in preset:  # a shipped preset with fields changed
        changes = {k: v for k, v in preset.items() if k != "preset"}
        recipe = common.variant(preset["preset"], variant, VARIANTS[variant], **changes)
    else:
        recipe = Recipe.from_dict(preset) if isinstance(preset, dict) else load_recipe(preset)
    calibration = Protocol().calibration_tokens(tokenizer) if needs_calibration(recipe) else None
    quantize(model, recipe, calibration, progress=False)
    pack_model(model)
    if variant.endswith("-f16"):  # what `channelwise quantize --float-dtype float16` saves
        round_float_tensors_(model, torch.float16)
    save_quantized(model, tokenizer, folder)


def build(variant: str, folder: str | None):
    """``(model, tokenizer, checkpoint bytes or None)``; packed variants load from ``folder``."""
    import torch

    from channelwise import load_model

    if variant in PRESETS:
        model, tokenizer = load_model(folder, device="cpu")
        return model, tokenizer, sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    model, tokenizer = load_model(device="cpu", dtype=dtype)
    if variant == "torchao-int8-dyn":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model, tokenizer, None


def measure(
    variant: str, repeats: int, folder: str | None, compiled: bool = False, cpp: bool = False
) -> dict:
    import torch

    from channelwise.deploy.decode import compile_decode
    from channelwise.memory import resident_bytes
    from channelwise.protocol import Protocol

    model, tokenizer, size = build(variant, folder)
    windows = Protocol().with_(windows=1).eval_tokens(tokenizer)
    prompt = windows[:, :512]
    short = windows[:, :16]
    generated: list = [None]

    def prefill() -> float:  # as generate() runs it: fill the KV cache, logits of the last token
        start = time.perf_counter()
        with torch.no_grad():
            model(prompt, use_cache=True, logits_to_keep=1)
        return prompt.shape[1] / (time.perf_counter() - start)

    def decode() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                short, max_new_tokens=128, min_new_tokens=128, do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
        seconds = time.perf_counter() - start
        generated[0] = out[0, short.shape[1] :]
        return (out.shape[1] - short.shape[1]) / seconds

    eager_tokens = None
    if compiled:  # the compiled loop must generate what the eager one does (a broken one did)
        decode()
        eager_tokens = generated[0]
        compile_decode(model, cpp_wrapper=cpp)
    prefill(), decode()  # warm-up (first-call allocations, kernel builds, compilation)
    row = {
        "variant": variant,
        "prefill_tok_s": statistics.median(prefill() for _ in range(repeats)),
        "decode_tok_s": statistics.median(decode() for _ in range(repeats)),
        "file_bytes": size,
        "rss_mb": resident_bytes() / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "compiled_decode": compiled,
        "cpp_wrapper": cpp,
    }
    from channelwise.deploy import sparse as deploy_sparse

    sparse = [
        m
        for m in model.modules()
        if isinstance(m, deploy_sparse.SparseGatedMLP)
        or getattr(m, deploy_sparse.SPARSE_INPUT_ATTR, False)
    ]
    if sparse:  # the same model on the dense products (activations still zeroed)
        sparse_tokens = generated[0]
        before, deploy_sparse.SPARSE_MAX_TOKENS = deploy_sparse.SPARSE_MAX_TOKENS, 0
        try:
            decode()
            row["decode_tok_s_dense_mlp"] = statistics.median(decode() for _ in range(repeats))
        finally:
            deploy_sparse.SPARSE_MAX_TOKENS = before
        row["dense_mlp_same_tokens"] = int((generated[0] == sparse_tokens).int().cumprod(0).sum())
        generated[0] = sparse_tokens
    if eager_tokens is not None:
        # Greedy decoding under other float rounding may part from eager at a near-tie and stay
        # sensible; a broken compiled loop emits text its own eager model finds unlikely.
        row["compiled_same_tokens"] = int((generated[0] == eager_tokens).int().cumprod(0).sum())
        row["eager_nll_of_compiled"] = continuation_nll(model, short, generated[0])
        row["eager_nll_of_eager"] = continuation_nll(model, short, eager_tokens)
    return row


def continuation_nll(model, prompt, tokens) -> float:
    """Mean negative log-likelihood per token of ``tokens`` after ``prompt``, by the eager
    forward of ``model`` (one teacher-forced pass)."""
    import torch
    import torch.nn.functional as F

    ids = torch.cat([prompt[0], tokens])[None]
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0, prompt.shape[1] - 1 : -1].float()
    return float(F.cross_entropy(logits, tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, help="torch threads in every variant (default: torch's)"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure every variant this many times, interleaved"
    )
    parser.add_argument(
        "--compile", action="store_true", help="decode through the compiled static-cache loop"
    )
    parser.add_argument(
        "--cpp-wrapper", action="store_true",
        help="with --compile: inductor's C++ wrapper (compile_decode(cpp_wrapper=True))",
    )  # fmt: skip
    parser.add_argument("--json", help="write the rows (and every round) here")
    parser.add_argument(
        "--checkpoints",
        help="keep each variant's packed checkpoint in this folder and reuse one already there "
        "(a rerun skips quantization and calibration; delete it after changing a preset)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one variant, print its JSON row
    parser.add_argument("--save", help=argparse.SUPPRESS)  # write one variant's checkpoint
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpp_wrapper and not args.compile:
        sys.exit("--cpp-wrapper applies to the compiled decode loop: add --compile")
    if args.one:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        row = measure(args.one, args.repeats, args.folder, args.compile, args.cpp_wrapper)
        print("ROW " + json.dumps(row), flush=True)
        return
    if args.save:
        save(args.save, args.folder)
        return
    variants = args.variants.split(",")
    for variant in variants:
        if variant not in VARIANTS:
            sys.exit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        kept = Path(args.checkpoints or tmp)
        folders = {v: str(kept / v) for v in variants if v in PRESETS}
        for variant, folder in folders.items():  # quantize in another process, once
            if Path(folder).is_dir():
                print(f"{variant:<18} reusing {folder}", flush=True)
                continue
            cmd = [sys.executable, __file__, "--save", variant, "--folder", folder]
            subprocess.run(cmd, capture_output=True, text=True, env=os.environ, check=False)
        for round_ in range(args.rounds):  # variants interleaved: drift hits them all alike
            for variant in variants:
                cmd = [sys.executable, __file__, "--one", variant, "--repeats", str(args.repeats)]
                cmd += ["--threads", str(args.threads)] if args.threads else []
                cmd += ["--compile"] if args.compile else []
                cmd += ["--cpp-wrapper"] if args.cpp_wrapper else []
                cmd += ["--folder", folders[variant]] if variant in folders else []
                done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
                line = [x for x in done.stdout.splitlines() if x.startswith("ROW ")]
                if done.returncode != 0 or not line:
                    why = (done.stderr.strip().splitlines() or ["no output"])[-1]
                    print(f"{variant:<18} round {round_ + 1}: skipped: {why}", flush=True)
                    continue
                runs[variant].append(json.loads(line[0][4:]))
                print(f"{variant:<18} round {round_ + 1}: measured", flush=True)
    rows = [merge(r) for r in runs.values() if r]
    report(rows)
    report_agreement(rows)
    report_spread(runs)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "runs": runs}, indent=2))


def merge(runs: list[dict]) -> dict:
    """One row per variant: the median over rounds of each figure, the rounds kept beside."""
    row = dict(runs[0])
    for key in ("prefill_tok_s", "decode_tok_s", "rss_mb", "peak_rss_mb", "decode_tok_s_dense_mlp"):
        if key in row:
            row[key] = statistics.median(r[key] for r in runs)
    if "compiled_same_tokens" in row:
        row["compiled_same_tokens"] = min(r["compiled_same_tokens"] for r in runs)
        row["eager_nll_of_compiled"] = max(r["eager_nll_of_compiled"] for r in runs)
    row["rounds"] = len(runs)
    return row


def report(rows: list[dict]) -> None:
    from channelwise.models import load_model

    base = next((r for r in rows if r["variant"] == "fp32"), None)
    model, _ = load_model(device="cpu")
    fp16_bytes = 2 * sum(p.numel() for p in model.parameters())
    print(f"\nfp16 checkpoint of this model: {fp16_bytes / 1e6:.1f} MB")
    if any(r.get("compiled_decode") for r in rows):
        wrapper = " (C++ wrapper)" if any(r.get("cpp_wrapper") for r in rows) else ""
        print(f"decode: static KV cache, compiled forward{wrapper} (deploy.decode.compile_decode)")
    print()
    print(
        "| variant | prefill tok/s | × fp32 | decode tok/s | × fp32 | file × fp16 | RSS MB "
        "| peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        pre = r["prefill_tok_s"] / base["prefill_tok_s"] if base else float("nan")
        dec = r["decode_tok_s"] / base["decode_tok_s"] if base else float("nan")
        size = f"{r['file_bytes'] / fp16_bytes:.3f}" if r["file_bytes"] else "—"
        print(
            f"| {r['variant']} | {r['prefill_tok_s']:.0f} | {pre:.2f} | {r['decode_tok_s']:.1f} "
            f"| {dec:.2f} | {size} | {r['rss_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    sparse = [r for r in rows if "decode_tok_s_dense_mlp" in r]
    if sparse:
        print("\nsparse MLP kernel against the same model's dense MLP path (same zeroing):")
    for r in sparse:
        print(
            f"  {r['variant']:<18} decode {r['decode_tok_s']:.1f} vs "
            f"{r['decode_tok_s_dense_mlp']:.1f} tok/s: "
            f"{r['decode_tok_s'] / r['decode_tok_s_dense_mlp']:.2f}x; same first "
            f"{r['dense_mlp_same_tokens']} greedy tokens"
        )


def report_agreement(rows: list[dict]) -> None:
    """With ``--compile``: whether the compiled loop computes the model. Greedy tokens may part
    from eager ones at a near-tie under other float rounding and stay sensible, so the check is
    the eager model's mean NLL per token of the compiled continuation against that of its own
    greedy one; more than 1 nat above means the compiled loop computes something else."""
    checked = [r for r in rows if "compiled_same_tokens" in r]
    if not checked:
        return
    print("\ncompiled decode against eager (128 greedy tokens; eager-model NLL per token):")
    for r in checked:
        gap = r["eager_nll_of_compiled"] - r["eager_nll_of_eager"]
        verdict = "  <- compiled loop is wrong: figure invalid" if gap > 1.0 else ""
        print(
            f"  {r['variant']:<18} same first {r['compiled_same_tokens']:>3}; NLL compiled "
            f"{r['eager_nll_of_compiled']:.2f} vs eager {r['eager_nll_of_eager']:.2f}{verdict}"
        )


def report_spread(runs: dict[str, list[dict]]) -> None:
    """Each round's ratio against the fp32 of the same round, min–max: how much to trust one."""
    base = runs.get("fp32", [])
    if len(base) < 2:
        return
    print("\nper-round ratios against that round's fp32 (min–max):")
    for variant, rs in runs.items():
        pairs = list(zip(rs, base, strict=False))
        for key, label in (("prefill_tok_s", "prefill"), ("decode_tok_s", "decode")):
            ratios = [r[key] / b[key] for r, b in pairs]
            print(f"  {variant:<18} {label:<8} {min(ratios):.2f}–{max(ratios):.2f}")


if __name__ == "__main__":
    main()
