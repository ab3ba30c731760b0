"""CPU linear kernels for packed weights vs fp32 ``F.linear``, per SmolLM2-135M linear shape.

Prints, for decode (1 token) and prefill (512 tokens) and each thread count, the median time of
every candidate per layer shape and summed over one block's 7 linears, with its ratio
``t(fp32) / t(candidate)`` (> 1 = faster than fp32) against the fp32 of the same run:

    .venv/bin/python benchmarks/kernels.py                 # decode + prefill, 1 and 2 threads
    /tmp/ao/bin/python benchmarks/kernels.py --torchao     # + torchao, from a venv that has it
    .venv/bin/python benchmarks/kernels.py --crossover     # weight-only kernel vs fp32 by M

Decode cycles through ``--copies`` distinct weights per shape (30 = one per SmolLM2 block), so
weights come from memory as in a real forward pass, not from a warm cache. Candidates run
interleaved, ``--repeats`` times, and the median is kept (the machine is shared).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from channelwise.kernels import cpu

# (name, out, in): one SmolLM2-135M block; k/v are 3 KV heads × 64.
SHAPES = [
    ("q", 576, 576),
    ("k", 192, 576),
    ("v", 192, 576),
    ("o", 576, 576),
    ("gate", 1536, 576),
    ("up", 1536, 576),
    ("down", 576, 1536),
]
GROUP = 64


def make_weights(out: int, inp: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One layer in every format the candidates need (same random fp32 weight underneath)."""
    w = torch.randn(out, inp, generator=gen) * 0.05
    w8_scale = w.abs().amax(1) / 127
    w8 = torch.round(w / w8_scale[:, None]).clamp(-127, 127).to(torch.int8)
    wg = w.view(out, -1, GROUP)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    s4 = (hi - lo) / 15
    z4 = torch.round(-lo / s4)
    q4 = torch.clamp(torch.round(wg / s4[..., None]) + z4[..., None], 0, 15).view(out, inp)
    q4 = q4.to(torch.uint8)
    packed = (q4[:, 0::2] | (q4[:, 1::2] << 4)).contiguous()
    tinygemm_sz = torch.stack([s4, (8 - z4) * s4], -1).transpose(0, 1).contiguous()
    return {
        "fp32": w,
        "bf16": w.to(torch.bfloat16),
        "w8": w8,
        "w8_t": w8.T.contiguous().T,  # (out, in) view of an (in, out) buffer: _int_mm's B
        "w8_scale": w8_scale,
        # what a packed W8A8 module passes: oneDNN's packed weight, the stored (unsigned) codes
        "w8_onednn": cpu.prepack_int8(w8),
        "w8_unsigned": cpu.unsigned_codes((w8.view(torch.uint8) ^ 0x80).contiguous()),
        "packed": packed,
        "s4": s4,
        "z4": z4,
        "int4pack": torch._convert_weight_to_int4pack_for_cpu(q4.to(torch.int32), 1),
        "tinygemm_sz": tinygemm_sz,
    }


def candidates(compiled: dict) -> dict[str, Callable]:
    """name → f(x, layer) for every candidate (x is the fp32 activation)."""

    def int_mm_bare(x, L):
        return torch._int_mm(L["xq"], L["w8_t"].T)

    return {
        "fp32": lambda x, L: F.linear(x, L["fp32"]),
        "bf16": lambda x, L: F.linear(L["x_bf16"], L["bf16"]),
        "w8a8 _int_mm bare": int_mm_bare,
        "w8a8 e2e (ours)": lambda x, L: cpu.w8a8_linear(x, L["w8"], L["w8_scale"]),
        "w8a8 e2e packed (ours)": lambda x, L: cpu.w8a8_linear(
            x, L["w8"], L["w8_scale"], w_packed=L["w8_onednn"], w_unsigned=L["w8_unsigned"]
        ),
        "w8 _weight_int8pack_mm": lambda x, L: torch._weight_int8pack_mm(x, L["w8"], L["w8_scale"]),
        "w8 deq+linear": lambda x, L: cpu.w8a16_reference(x, L["w8"], L["w8_scale"]),
        "w8 deq+linear compiled": lambda x, L: compiled["w8"](x, L["w8"], L["w8_scale"]),
        "w8a16 ours": lambda x, L: cpu.w8a16_linear(x, L["w8"], L["w8_scale"]),
        "w4 _weight_int4pack_mm_for_cpu": lambda x, L: torch._weight_int4pack_mm_for_cpu(
            x, L["int4pack"], GROUP, L["tinygemm_sz"]
        ),
        "w4 deq+linear": lambda x, L: cpu.w4a16_reference(x, L["packed"], L["s4"], L["z4"], GROUP),
        "w4 deq+linear compiled": lambda x, L: compiled["w4"](
            x, L["packed"], L["s4"], L["z4"], GROUP
        ),
        "w4a16 ours": lambda x, L: cpu.w4a16_linear(x, L["packed"], L["s4"], L["z4"], GROUP),
    }


def add_torchao(cands: dict, layers: list[list[dict]]) -> None:
    """torchao's int8 weight-only, int4 CPU and int8 dynamic, applied to nn.Linear copies."""
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    configs = {
        "torchao int8 weight-only": Int8WeightOnlyConfig(),
        "torchao int4 cpu (opaque)": Int4WeightOnlyConfig(
            group_size=GROUP, int4_packing_format="opaque"
        ),
        "torchao int8 dynamic (w8a8)": Int8DynamicActivationInt8WeightConfig(),
    }
    for name, config in configs.items():
        try:
            for copies in layers:
                for L in copies:
                    lin = torch.nn.Linear(L["fp32"].shape[1], L["fp32"].shape[0], bias=False)
                    lin.weight.data = L["fp32"].clone()
                    module = torch.nn.Sequential(lin)
                    quantize_(module, config)
                    L[name] = module
            cands[name] = lambda x, L, name=name: L[name](x)
        except Exception as error:  # noqa: BLE001 — report and go on
            print(f"# {name}: failed: {type(error).__name__}: {str(error)[:150]}")


def compile_dequant() -> dict[str, Callable]:
    return {
        "w8": torch.compile(cpu.w8a16_reference, dynamic=False),
        "w4": torch.compile(cpu.w4a16_reference, dynamic=False),
    }


def time_candidate(fn, x, copies: list[dict], inner: int) -> float:
    """Seconds per call, averaged over ``inner`` passes through all copies."""
    t0 = time.perf_counter()
    for _ in range(inner):
        for L in copies:
            fn(x, L)
    return (time.perf_counter() - t0) / (inner * len(copies))


def bench(m: int, threads: int, args, layers, cands) -> dict[str, dict[str, float]]:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(1)
    results: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for (name, _out, inp), copies in zip(SHAPES, layers, strict=True):
            x = torch.randn(m, inp, generator=gen)
            xq, _ = cpu.quantize_per_token(torch.cat([x, x.new_zeros(max(0, 17 - m), inp)]))
            for L in copies:
                L["x_bf16"], L["xq"] = x.to(torch.bfloat16), xq
            usable = {}
            for cname, fn in cands.items():
                try:
                    t_warm = time.perf_counter()
                    time_candidate(fn, x, copies, 1)  # warm-up (and torch.compile)
                    usable[cname] = fn
                    if "compiled" in cname and time.perf_counter() - t_warm > 1:
                        print(
                            f"# {name} M={m}: {cname} warm-up (compile) "
                            f"{time.perf_counter() - t_warm:.1f} s"
                        )
                except Exception as error:  # noqa: BLE001 — report and go on
                    print(f"# {name} M={m}: {cname} failed: {str(error).splitlines()[0][:120]}")
            samples: dict[str, list[float]] = {c: [] for c in usable}
            for _ in range(args.repeats):
                for cname, fn in usable.items():
                    samples[cname].append(time_candidate(fn, x, copies, args.inner))
            results[name] = {c: statistics.median(s) for c, s in samples.items()}
    return results


def print_table(title: str, results: dict[str, dict[str, float]]) -> None:
    names = list(results)
    cands = [c for c in results[names[0]] if all(c in results[n] for n in names)]
    block = {c: sum(results[n][c] for n in names) for c in cands}
    print(f"\n### {title}\n")
    print("| candidate | " + " | ".join(names) + " | block (7 linears) |")
    print("|---" * (len(names) + 2) + "|")
    for c in cands:
        cells = [
            f"{results[n][c] * 1e6:.0f} µs ({results[n]['fp32'] / results[n][c]:.2f}×)"
            for n in names
        ]
        cells.append(f"{block[c] * 1e6:.0f} µs ({block['fp32'] / block[c]:.2f}×)")
        print(f"| {c} | " + " | ".join(cells) + " |")


def crossover(args, layers) -> None:
    """Our weight-only kernels vs fp32 and vs de-quantize + F.linear as M grows."""
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n### crossover, {threads} thread(s): ratio t(fp32)/t(candidate), gate 1536×576\n")
        print("| M | w8a16 kernel | w8 deq+linear | w4a16 kernel | w4 deq+linear |")
        print("|---|---|---|---|---|")
        copies = layers[4]
        for m in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
            x = torch.randn(m, 576)
            fns = {
                "fp32": lambda x, L: F.linear(x, L["fp32"]),
                "k8": lambda x, L: cpu._ops().w8a16_mm(x, L["w8"], L["w8_scale"], None),
                "d8": lambda x, L: cpu.w8a16_reference(x, L["w8"], L["w8_scale"]),
                "k4": lambda x, L: cpu._ops().w4a16_mm(x, L["packed"], L["s4"], L["z4"], 64, None),
                "d4": lambda x, L: cpu.w4a16_reference(x, L["packed"], L["s4"], L["z4"], GROUP),
            }
            t = {k: [] for k in fns}
            for _ in range(args.repeats):
                for k, fn in fns.items():
                    t[k].append(time_candidate(fn, x, copies, args.inner))
            med = {k: statistics.median(v) for k, v in t.items()}
            r = [f"{med['fp32'] / med[k]:.2f}×" for k in ("k8", "d8", "k4", "d4")]
            print(f"| {m} | " + " | ".join(r) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--inner", type=int, default=3, help="passes over the copies per sample")
    p.add_argument("--copies", type=int, default=30, help="distinct weights per shape (decode)")
    p.add_argument("--prefill-copies", type=int, default=2)
    p.add_argument("--tokens", type=int, default=512, help="prefill length")
    p.add_argument("--only", choices=["decode", "prefill"], help="skip the other phase")
    p.add_argument("--torchao", action="store_true", help="add torchao's CPU paths")
    p.add_argument("--crossover", action="store_true", help="only the kernel-vs-M table")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidates")
    args = p.parse_args()

    t0 = time.perf_counter()
    available = cpu.kernel_available()
    print(
        f"# torch {torch.__version__}, kernel available: {available} "
        f"(load/compile {time.perf_counter() - t0:.1f} s)"
    )
    gen = torch.Generator().manual_seed(0)
    n_copies = max(args.copies, args.prefill_copies)
    layers = [[make_weights(o, i, gen) for _ in range(n_copies)] for _, o, i in SHAPES]
    if args.crossover:
        crossover(args, layers)
        return
    compiled = {} if args.no_compile else compile_dequant()
    cands = candidates(compiled)
    if args.no_compile:
        cands = {k: v for k, v in cands.items() if "compiled" not in k}
    if args.torchao:
        add_torchao(cands, layers)
    phases = {"decode": (1, args.copies), "prefill": (args.tokens, args.prefill_copies)}
    for phase, (m, copies) in phases.items():
        if args.only and phase != args.only:
            continue
        phase_cands = cands
        if phase == "prefill":  # slow paths that decode already rules out, 10-60x slower
            phase_cands = {k: v for k, v in cands.items() if "pack_mm" not in k}
        for threads in args.threads:
            t_phase = time.perf_counter()
            res = bench(m, threads, args, [c[:copies] for c in layers], phase_cands)
            print_table(
                f"{phase}, M={m}, {threads} thread(s), {copies} weight copies per shape "
                f"[median of {args.repeats}; ratio = fp32 / candidate] "
                f"({time.perf_counter() - t_phase:.0f} s)",
                res,
            )


if __name__ == "__main__":
    main()
