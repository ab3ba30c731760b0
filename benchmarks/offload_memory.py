"""Peak memory with the weights left on disk (``--offload``) against the model whole in memory.

For each recipe, ``channelwise quantize`` runs as a child process twice on the same protocol
calibration samples (Emma): once with the model in memory (``--format fake``), once with
``--offload`` (the decoder blocks read from disk one at a time and written back block by block).
Each saved model is then evaluated on the protocol's windows (Pride and Prejudice), the in-memory
one with ``channelwise eval``, the offloaded one with ``channelwise eval --offload``; the float
model is evaluated both ways too. Reported per command: wall seconds and the child's peak resident
memory (``ru_maxrss`` from ``wait4``, which includes Python, torch and the tokenizer: about
380 MiB before any model is read), the perplexity, and the largest difference between the two
saved checkpoints' tensors. Every figure is from this run.

``--packed`` saves both outputs packed (integer codes; the offloaded run packs block by block)
and evaluates each with the model whole in memory, which a packed model fits; without it they
are saved as float weights on the grid (``--format fake``) and the offloaded one is evaluated
offloaded. ``--gptq-blocks N`` instead runs offloaded GPTQ on the first N blocks only and
stops (a child process; seconds per block and its peak memory), for a model too large to
calibrate whole in one sitting. ``--only-offload`` skips the in-memory runs, for a model that
does not fit in memory;
``--synthetic-qwen2-7b DIR`` first writes such a model: a Qwen2 checkpoint with the layer sizes
of a 7B model (28 blocks, hidden 3584, 7.6 B parameters: 30 GB in float32) and random weights
(normal, std 0.02), in bfloat16 shards written block by block, with SmolLM2's tokenizer. Its
perplexity is that of random weights; what it shows is the memory.

    .venv/bin/python benchmarks/offload_memory.py [--model DIR] [--recipes rtn-w4a16-g64,...]
        [--samples 32] [--windows 16] [--only-offload] [--no-fp] [--packed] [--gptq-blocks N]
        [--synthetic-qwen2-7b DIR] [--json docs/runs/offload-memory.json]
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
from safetensors import safe_open

from channelwise.offload import SafetensorsFolder
from channelwise.paths import write_atomic

DEFAULT = "rtn-w4a16-g64,gptq-w4a16-g64"


def channelwise(*argv: str) -> tuple[float, float]:
    """Run ``channelwise argv…`` as a child; its wall seconds and peak resident MiB."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "channelwise.cli", "-q", *argv])
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        sys.exit(f"channelwise {' '.join(argv)} failed with exit code {child.returncode}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def gptq_first_blocks(model: str, blocks: int, samples: int, report: Path) -> None:
    """(In a child process) offloaded GPTQ W4 g64 on the first ``blocks`` blocks of ``model``,
    then stop; writes the seconds each block took to ``report``."""
    from channelwise import quantize
    from channelwise.methods.gptq import GPTQ
    from channelwise.offload import load_offloaded
    from channelwise.protocol import Protocol

    class Enough(Exception):
        pass

    model_, tokenizer = load_offloaded(model)
    calibration = Protocol().with_(calib_samples=samples).calibration_tokens(tokenizer)
    seconds: list[float] = []
    apply = GPTQ.apply

    def timed(self, ctx) -> None:
        start = time.perf_counter()
        apply(self, ctx)
        seconds.append(time.perf_counter() - start)
        print(f"block {ctx.index}: {seconds[-1]:.1f} s", flush=True)
        if len(seconds) == blocks:
            raise Enough

    GPTQ.apply = timed
    try:
        quantize(model_, "gptq-w4a16-g64", calibration)
    except Enough:
        pass
    report.write_text(json.dumps({"seconds_per_block": seconds}))


def gptq_row(model: str, blocks: int, samples: int, work: Path) -> dict:
    report = work / "gptq-blocks.json"
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, __file__, "--model", model, "--gptq-child", str(report),
         "--gptq-blocks", str(blocks), "--samples", str(samples)]
    )  # fmt: skip
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit("the GPTQ child failed")
    per_block = json.loads(report.read_text())["seconds_per_block"]
    total = json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"]
    return {
        "recipe": "gptq-w4a16-g64", "offload": True, "blocks_done": len(per_block),
        "blocks": total, "seconds_per_block": per_block, "calib_s": time.perf_counter() - start,
        "calib_peak_mib": usage.ru_maxrss / 1024,
    }  # fmt: skip


def evaluate(model: str, offload: bool, windows: int, report: Path) -> dict:
    flag = ["--offload"] if offload else []
    seconds, peak = channelwise(
        "eval", model, *flag, "--windows", str(windows), "--json", str(report)
    )
    return {"ppl": json.loads(report.read_text())["ppl"], "eval_s": seconds, "eval_peak_mib": peak}


def largest_difference(a: Path, b: Path) -> float:
    left, right = SafetensorsFolder.open(a), SafetensorsFolder.open(b)
    if set(left.files) != set(right.files):
        return float("inf")
    worst = 0.0
    for key in left.files:
        x, y = left.read([key])[key].float(), right.read([key])[key].float()
        worst = max(worst, (x - y).abs().max().item() if x.numel() else 0.0)
    return worst


QWEN2_7B = {
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "dtype": "bfloat16",
}  # fmt: skip


def write_synthetic_qwen2(folder: Path, sizes: dict = QWEN2_7B) -> None:
    """A Qwen2 checkpoint of ``sizes`` with random bfloat16 weights, written block by block."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2Config

    from channelwise.models import resolve_model

    config = Qwen2Config(**sizes)
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    total = config.num_hidden_layers + 1
    weight_map: dict[str, str] = {}
    for index in range(total):
        name = f"model-{index + 1:05d}-of-{total:05d}.safetensors"
        if index == 0:
            tensors = {
                "model.embed_tokens.weight": normal(config.vocab_size, h),
                "lm_head.weight": normal(config.vocab_size, h),
                "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
            }
        else:
            p = f"model.layers.{index - 1}."
            shapes = {
                "self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h),
                "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h),
                "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i),
            }  # fmt: skip
            tensors = {f"{p}{n}.weight": normal(*shape) for n, shape in shapes.items()}
            for n, size in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
                tensors[f"{p}self_attn.{n}.bias"] = normal(size)
            for n in ("input_layernorm", "post_attention_layernorm"):
                tensors[f"{p}{n}.weight"] = torch.ones(h, dtype=torch.bfloat16)
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        print(f"wrote {name}", flush=True)
    index_json = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model(None)).save_pretrained(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint folder (default: the embedded SmolLM2)")
    p.add_argument("--recipes", default=DEFAULT)
    p.add_argument("--samples", type=int, default=32, help="calibration samples (of 512 tokens)")
    p.add_argument("--windows", type=int, default=16, help="evaluation windows (of 512 tokens)")
    p.add_argument("--only-offload", action="store_true", help="skip the in-memory runs")
    p.add_argument("--no-fp", action="store_true", help="skip evaluating the float model")
    p.add_argument("--synthetic-qwen2-7b", type=Path, help="write that model here first")
    p.add_argument("--packed", action="store_true", help="save and evaluate packed outputs")
    p.add_argument("--gptq-blocks", type=int, help="offloaded GPTQ on the first N blocks only")
    p.add_argument("--gptq-child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.gptq_child is not None:
        return gptq_first_blocks(args.model, args.gptq_blocks, args.samples, args.gptq_child)
    if args.synthetic_qwen2_7b is not None:
        if not args.synthetic_qwen2_7b.exists():
            write_synthetic_qwen2(args.synthetic_qwen2_7b)
        args.model = str(args.synthetic_qwen2_7b)
    from channelwise.models import resolve_model

    model = str(resolve_model(args.model))
    modes = (True,) if args.only_offload else (False, True)
    rows: list[dict] = []
    fp32_mib = _parameter_mib(model)

    def keep(row: dict) -> None:
        """Print a row and rewrite the JSON report with every row so far (a long run that is
        stopped keeps what it measured)."""
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            report = {
                "model": model,
                "fp32_parameter_mib": fp32_mib,
                "samples": args.samples,
                "windows": args.windows,
                "format": "packed" if args.packed else "fake",
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "torch": torch.__version__,
                "rows": rows,
            }
            write_atomic(args.json, json.dumps(report, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="offload-bench-", dir=Path(model).parent) as tmp:
        work = Path(tmp)
        if args.gptq_blocks:
            keep(gptq_row(model, args.gptq_blocks, args.samples, work))
            return
        for offload in () if args.no_fp else modes:
            row = {"recipe": "fp", "offload": offload, "calib_s": 0.0, "calib_peak_mib": None}
            keep(row | evaluate(model, offload, args.windows, work / "eval.json"))
        fmt = "packed" if args.packed else "fake"
        for recipe in args.recipes.split(","):
            outs = {}
            for offload in modes:
                out = work / f"{recipe}-{'disk' if offload else 'memory'}"
                flag = ["--offload"] if offload else []
                seconds, peak = channelwise(
                    "quantize", model, "--recipe", recipe, *flag, "--format", fmt,
                    "--out", str(out), "--calib-samples", str(args.samples),
                )  # fmt: skip
                row = {"recipe": recipe, "offload": offload, "calib_s": seconds}
                row |= {"calib_peak_mib": peak, "out_mib": _folder_mib(out)}
                # a packed folder is evaluated whole in memory, however it was quantized
                row |= evaluate(str(out), offload and not args.packed, args.windows,
                                work / "eval.json")  # fmt: skip
                if outs:
                    row["max_abs_diff_to_memory"] = largest_difference(outs[False], out)
                outs[offload] = out
                keep(row)
            for out in outs.values():
                subprocess.run(["rm", "-rf", str(out)], check=True)
    print(f"\nmodel: {model} ({fp32_mib:,.0f} MiB of float32 parameters)")
    print("| recipe | weights | quantize s | quantize peak MiB | ppl | eval s | eval peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        where = "on disk" if r["offload"] else "in memory"
        calib = f"{r['calib_peak_mib']:,.0f}" if r["calib_peak_mib"] else "–"
        print(
            f"| {r['recipe']} | {where} | {r['calib_s']:.0f} | {calib} | {r['ppl']:.3f} "
            f"| {r['eval_s']:.0f} | {r['eval_peak_mib']:,.0f} |"
        )


def _folder_mib(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors")) / 2**20


def _parameter_mib(model: str) -> float:
    folder = SafetensorsFolder.open(Path(model))
    total = 0
    for path in set(folder.files.values()):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                total += 4 * int(torch.Size(shape).numel())
    return total / 2**20


if __name__ == "__main__":
    main()
