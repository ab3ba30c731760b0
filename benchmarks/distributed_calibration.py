"""Calibration across processes on SmolLM2-135M: one process against ``torchrun`` with two.

For each recipe, ``channelwise quantize`` runs twice on the same machine and the same protocol
calibration samples (Emma): once as one process with ``--threads`` torch threads, once under
``torchrun --nproc_per_node N`` (gloo) with ``--threads / N`` threads per process, so both use the
same cores. Reported: the wall time of each command (model load and save included), the largest
difference between the two saved checkpoints' tensors, and the perplexity of each saved model on
the protocol's evaluation windows (``channelwise eval``). Every figure is from this run.

    .venv/bin/python benchmarks/distributed_calibration.py [--recipes gptq-w4a16-g64,...]
        [--processes 2] [--threads 2] [--samples 128]
        [--json docs/runs/distributed-calibration.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from channelwise.paths import write_atomic

DEFAULT = "gptq-w4a16-g64,smoothquant-w8a8"


def channelwise(*argv: str, threads: int, processes: int = 1) -> float:
    """Run ``channelwise argv…`` (under torchrun when ``processes`` > 1); its wall seconds."""
    launcher = [sys.executable, "-m", "channelwise.cli"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launcher += ["--nproc_per_node", str(processes), "-m", "channelwise.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run([*launcher, "-q", "--device", "cpu", *argv], env=env, text=True)
    if done.returncode:
        sys.exit(f"channelwise {' '.join(argv)} failed with exit code {done.returncode}")
    return time.perf_counter() - start


def perplexity(folder: Path, report: Path, threads: int, windows: int | None) -> float:
    extra = ["--windows", str(windows)] if windows else []
    channelwise("eval", str(folder), *extra, "--json", str(report), threads=threads)
    return json.loads(report.read_text())["ppl"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default=DEFAULT)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="threads in all (split by processes)")
    p.add_argument("--samples", type=int, default=128, help="calibration samples (of 512 tokens)")
    p.add_argument("--windows", type=int, help="evaluation windows (fewer: smoke checks only)")
    p.add_argument("--json")
    args = p.parse_args()
    if args.processes < 2 or args.threads % args.processes:
        p.error("--processes must be at least 2 and divide --threads")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in (n.strip() for n in args.recipes.split(",") if n.strip()):
            common = ["quantize", "--recipe", recipe, "--calib-samples", str(args.samples)]
            one, many = Path(tmp, f"{recipe}-one"), Path(tmp, f"{recipe}-many")
            one_s = channelwise(*common, "--out", str(one), threads=args.threads)
            many_s = channelwise(
                *common,
                "--out",
                str(many),
                threads=args.threads // args.processes,
                processes=args.processes,
            )
            a, b = (load_file(str(f / "model.safetensors")) for f in (one, many))
            if sorted(a) != sorted(b):
                sys.exit(f"{recipe}: the two checkpoints hold different tensors")
            worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
            different = sum(not torch.equal(a[k], b[k]) for k in a)
            report = Path(tmp, "eval.json")
            ppl_one = perplexity(one, report, args.threads, args.windows)
            ppl_many = perplexity(many, report, args.threads, args.windows)
            rows[recipe] = {
                "one_process_s": one_s,
                "processes_s": many_s,
                "speedup": one_s / many_s,
                "max_abs_diff": worst,
                "tensors_differing": different,
                "tensors": len(a),
                "ppl_one_process": ppl_one,
                "ppl_processes": ppl_many,
            }
            print(
                f"{recipe:<24} 1 process {one_s:7.1f}s  {args.processes} processes {many_s:7.1f}s"
                f" ({one_s / many_s:4.2f}×)  max |Δ| {worst:.3g} ({different}/{len(a)} tensors)"
                f"  ppl {ppl_one:.3f} / {ppl_many:.3f}",
                flush=True,
            )
    if args.json:
        meta = {
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "processes": args.processes,
            "calib_samples": args.samples,
            "windows": args.windows,
        }
        write_atomic(args.json, json.dumps({"_meta": meta, **rows}, indent=2))


if __name__ == "__main__":
    main()
