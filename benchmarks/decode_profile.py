"""Where a decode step's time goes: per-token CPU time of each part of greedy decoding at batch 1,
for packed variants of the benchmark model, through the compiled loop (not a test).

Each packed variant is loaded from its checkpoint (``benchmarks/speed.py --checkpoints DIR``
makes and keeps them; this script saves any that is missing the same way), its decode compiled
(:func:`channelwise.deploy.decode.compile_decode`, with inductor's kernel profiling on so its
fused C++ kernels are named), warmed up, then ``--tokens`` new tokens are generated after a
16-token prompt under ``torch.profiler``. Self CPU time is summed per part: each integer-kernel
op by the linear it serves (told apart by its weight's shape: SmolLM2-135M's q/o, k/v, gate/up,
down and LM head), the sparse ops (CHESS's fused MLP, the sparse-input q/o products, the
thresholding), the fused elementwise kernels (norms, rotary, residuals, thresholds fused in),
attention, and the rest. The profiler adds overhead per op, so the parts are shares of a
profiled step; the unprofiled decode time of the same model is printed beside them.

    .venv/bin/python benchmarks/decode_profile.py --checkpoints ckpt \\
        [--variants fp32,w4a16-e8,w4a16-e8-chess-50] [--tokens 64] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

#: SmolLM2-135M's linears by (out, in) features.
LINEARS = {
    (576, 576): "q/o_proj",
    (192, 576): "k/v_proj",
    (1536, 576): "gate/up_proj",
    (576, 1536): "down_proj",
    (49152, 576): "lm_head",
}


def linear_of(shapes: list) -> str:
    """The linear a weight-only kernel call served, from its weight operand's shape (W4 packs
    two codes per byte along the input)."""
    for shape in shapes[1:2]:
        if len(shape) == 2:
            out, packed = shape
            for k in (packed, 2 * packed):
                if (out, k) in LINEARS:
                    return LINEARS[(out, k)]
    return "?"


def part_of(key: str, shapes: list) -> str:
    """The part of a decode step a profiler event belongs to."""
    if key.startswith("channelwise_cpu::"):
        op = key.split("::", 1)[1]
        if op == "sparse_mlp":
            return "sparse MLP (up rows + down columns)"
        if op == "sparse_input_mm":
            return "sparse-input q/o_proj"
        if op == "sparsify":
            return "thresholding (sparsify op)"
        if op in ("w4a16_mm", "w8a16_mm", "half_mm"):
            return f"{op} {linear_of(shapes)}"
        return op
    if "cpp_fused" in key or key.startswith("kernel_cpp") or "graph_" in key:
        return "fused elementwise kernels (inductor)"
    if "attention" in key or key in ("aten::bmm", "aten::_softmax", "aten::baddbmm"):
        return "attention"
    if key in ("aten::mm", "aten::addmm", "aten::linear"):
        return "float GEMM"
    return "other"


def profile(variant: str, folder: str, tokens: int, threads: int | None) -> dict:
    import torch
    import torch._inductor.config as inductor_config
    from speed import build  # benchmarks/speed.py, beside this script

    from channelwise.deploy.decode import compile_decode
    from channelwise.protocol import Protocol

    if threads:
        torch.set_num_threads(threads)
    inductor_config.cpp.enable_kernel_profile = True
    model, tokenizer, _ = build(variant, folder)
    short = Protocol().with_(windows=1).eval_tokens(tokenizer)[:, :16]
    compile_decode(model)

    def generate() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                short, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
        return time.perf_counter() - start

    generate(), generate()  # compilation and warm-up
    plain = min(generate() for _ in range(3))
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        profiled = generate()
    parts: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    others: dict[str, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        part = part_of(event.key, event.input_shapes)
        parts[part] += event.self_cpu_time_total / tokens
        calls[part] += event.count
        if part == "other":
            others[event.key] += event.self_cpu_time_total / tokens
    return {
        "variant": variant,
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "decode_us_per_token": plain / tokens * 1e6,
        "profiled_us_per_token": profiled / tokens * 1e6,
        "parts_us_per_token": dict(sorted(parts.items(), key=lambda kv: -kv[1])),
        "calls_per_token": {k: calls[k] / tokens for k in parts},
        "other_top_us_per_token": dict(sorted(others.items(), key=lambda kv: -kv[1])[:10]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="w4a16-e8,w4a16-e8-chess-50")
    p.add_argument("--checkpoints", required=True, help="speed.py's checkpoint folder")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    here = Path(__file__).parent
    if args.one:
        row = profile(args.one, str(Path(args.checkpoints) / args.one), args.tokens, args.threads)
        print("ROW " + json.dumps(row), flush=True)
        return
    rows = []
    from speed import PRESETS

    for variant in args.variants.split(","):
        folder = Path(args.checkpoints) / variant
        if variant in PRESETS and not folder.is_dir():
            print(f"{variant}: saving {folder} (speed.py --save)", flush=True)
            cmd = [sys.executable, str(here / "speed.py"), "--save", variant, "--folder"]
            subprocess.run([*cmd, str(folder)], check=True)
        cmd = [sys.executable, __file__, "--one", variant, "--checkpoints", args.checkpoints]
        cmd += ["--tokens", str(args.tokens), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in done.stdout.splitlines() if x.startswith("ROW ")]
        if done.returncode != 0 or not line:
            sys.exit(f"{variant}: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
        rows.append(json.loads(line[0][4:]))
        report(rows[-1])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))


def report(row: dict) -> None:
    print(
        f"\n{row['variant']}: {row['decode_us_per_token']:.0f} µs/token decoding "
        f"({row['profiled_us_per_token']:.0f} profiled), {row['threads']} thread(s)"
    )
    total = sum(row["parts_us_per_token"].values())
    for part, us in row["parts_us_per_token"].items():
        calls = row["calls_per_token"][part]
        print(f"  {part:<40} {us:8.0f} µs  {100 * us / total:5.1f}%  {calls:6.1f} calls")
    print("  largest in 'other': " + ", ".join(
        f"{key} {us:.0f} µs" for key, us in row["other_top_us_per_token"].items()
    ))  # fmt: skip


if __name__ == "__main__":
    main()
