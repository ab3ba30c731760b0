"""Peak memory of turning a GGUF file into a float32 checkpoint: channelwise's converter against
transformers' own GGUF loader, each in a fresh child process, on the same file.

``channelwise`` is ``channelwise.gguf_source.convert_gguf`` (memory-mapped file, one tensor
dequantized at a time, one shard written per block); ``transformers`` is what channelwise did
before: ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=…, dtype=float32)``, its
weights then saved as one safetensors file (a tied head once). Reported per way: wall seconds,
the child's peak resident memory (``ru_maxrss`` from ``wait4``, Python and torch included), the
output's size; and whether the two outputs hold the same tensors bit for bit. Every figure is
from this run.

    .venv/bin/python benchmarks/gguf_convert_memory.py [--gguf FILE]
        [--json docs/runs/gguf-convert-memory.json]
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

from channelwise.models import embedded_gguf
from channelwise.offload import SafetensorsFolder
from channelwise.paths import write_atomic

CHILD = {
    "channelwise": (
        "from pathlib import Path; from channelwise.gguf_source import convert_gguf; "
        "convert_gguf(Path({gguf!r}), Path({out!r}))"
    ),
    "transformers": (
        "import torch; from pathlib import Path; from safetensors.torch import save_file; "
        "from transformers import AutoModelForCausalLM; p = Path({gguf!r}); "
        "m = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, "
        "dtype=torch.float32); tied = m.config.tie_word_embeddings; "
        "save_file({{k: v.contiguous() for k, v in m.state_dict().items() "
        "if not (tied and k == 'lm_head.weight')}}, {out!r} + '/model.safetensors')"
    ),
}


def run_child(code: str) -> tuple[float, float]:
    """Run ``python -c code``; its wall seconds and peak resident MiB."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code])
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"child failed: {code}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    source = SafetensorsFolder.open(folder)
    return source.read(sorted(source.files))


def same_tensors(a: Path, b: Path) -> bool:
    """The same keys, each with the same dtype and values."""
    ta, tb = tensors(a), tensors(b)
    return set(ta) == set(tb) and all(
        ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=Path, default=None, help="a .gguf file (default: SmolLM2's)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    gguf = args.gguf or embedded_gguf()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        outs = {}
        for way, code in CHILD.items():
            out = Path(work) / way
            out.mkdir()
            seconds, peak = run_child(code.format(gguf=str(gguf), out=str(out)))
            size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
            rows.append({"way": way, "seconds": seconds, "peak_mib": peak, "out_mib": size})
            print(f"{way:13s} {seconds:7.1f} s  peak {peak:8,.0f} MiB  output {size:8,.0f} MiB")
            outs[way] = out
        identical = same_tensors(outs["channelwise"], outs["transformers"])
    print(f"same tensors: {identical}; peak ratio {rows[0]['peak_mib'] / rows[1]['peak_mib']:.2f}")
    if args.json:
        report = {
            "gguf": gguf.name,
            "gguf_mib": gguf.stat().st_size / 2**20,
            "same_tensors": identical,
            "rows": rows,
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
            "torch": torch.__version__,
        }
        write_atomic(args.json, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
