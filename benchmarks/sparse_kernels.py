"""The sparse MLP decode kernel against the dense one, on SmolLM2-sized weights (not a test).

One decode token through ``down(a · up(x))`` for ``--layers`` distinct random up (1536 × 576) and
down (576 × 1536) weights, so the weights stream from memory as in a real forward pass; ``a`` has
``--active`` of its 1536 channels nonzero (a fresh random set per layer). Dense: two linears on
the whole weights (fp32 ``F.linear``, or the packed W4 g64 decode kernel); sparse:
:func:`channelwise.kernels.sparse.sparse_mlp`, reading only the active rows of up and columns of
down. Candidates run interleaved, ``--repeats`` times; medians per MLP, and the ratio dense /
sparse (> 1: the sparse kernel is faster). The W4 halves are also timed apart (``up_proj``: the
active rows against the dense product; ``down_proj``: the active columns against the dense
product on the zeroed activation), each call with its own dispatch cost.

Also LPViT's block-sparse linear (:class:`~channelwise.deploy.block_sparse.BlockSparseLinear`)
against the dense ``F.linear`` on one ViT-S MLP weight (1536 × 384) with half of its blocks
zeroed at random, for a batch of 32 images × 65 tokens (DINOv2-S at 112 px), at 16 × 16 and
32 × 32 blocks, and the same kernel on the unpruned weight (every block kept: the kernel's own
speed against ``F.linear``, apart from the sparsity)::

    .venv/bin/python benchmarks/sparse_kernels.py --threads 1 \
        --json docs/runs/cpu-sparse-kernels-1thread.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import common  # benchmarks/common.py: this folder is on sys.path when run as a script
import torch
import torch.nn.functional as F
from kernels import GROUP, make_weights

from channelwise.deploy.block_sparse import BlockSparseLinear
from channelwise.kernels import cpu
from channelwise.kernels.extension import load_ops
from channelwise.kernels.sparse import (
    SparseWeight,
    cols_linear,
    rows_linear,
    sparse_mlp,
    transpose_weight,
)

HIDDEN, INTERMEDIATE = 576, 1536


def make_layer(active: float, gen: torch.Generator) -> dict:
    up, down = make_weights(INTERMEDIATE, HIDDEN, gen), make_weights(HIDDEN, INTERMEDIATE, gen)
    a = torch.randn(1, INTERMEDIATE, generator=gen)
    keep = torch.randperm(INTERMEDIATE, generator=gen)[: round(active * INTERMEDIATE)].sort().values
    a = torch.zeros_like(a).index_copy_(1, keep, a[:, keep])
    up4 = SparseWeight(up["packed"], up["s4"], up["z4"], GROUP)
    down4 = SparseWeight(down["packed"], down["s4"], down["z4"], GROUP)
    return {
        "a": a,
        "idx": keep,
        "h": a[:, keep].contiguous(),
        "up": up["fp32"],
        "down": down["fp32"],
        "up4": up4,
        "down4": down4,
        "up_sparse": SparseWeight(up["fp32"]),
        "down_t": transpose_weight(SparseWeight(down["fp32"])),
        "down4_t": transpose_weight(down4),
    }


def candidates() -> dict[str, Callable]:
    def w4(x, w: SparseWeight):
        return cpu.w4a16_linear(x, w.w, w.scale, w.zero, w.group)

    return {
        "fp32 dense": lambda x, L: F.linear(F.linear(x, L["up"]) * L["a"], L["down"]),
        "fp32 sparse": lambda x, L: sparse_mlp(x, L["a"], L["up_sparse"], L["down_t"]),
        "w4 dense": lambda x, L: w4(w4(x, L["up4"]) * L["a"], L["down4"]),
        "w4 sparse": lambda x, L: sparse_mlp(x, L["a"], L["up4"], L["down4_t"]),
        # The two halves apart (where a loss hides): up's active rows, down's active columns.
        "w4 up_proj dense": lambda x, L: w4(x, L["up4"]),
        "w4 up_proj sparse": lambda x, L: rows_linear(x, L["idx"], L["up4"]),
        "w4 down_proj dense": lambda x, L: w4(L["a"], L["down4"]),
        "w4 down_proj sparse": lambda x, L: cols_linear(L["h"], L["idx"], L["down4_t"]),
    }


def seconds_per_mlp(fn: Callable, x: torch.Tensor, layers: list[dict], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        for layer in layers:
            fn(x, layer)
    return (time.perf_counter() - start) / (inner * len(layers))


def check(x: torch.Tensor, layer: dict, cands: dict[str, Callable]) -> dict[str, float]:
    """Each sparse result's largest relative difference from its dense counterpart."""
    out = {c: fn(x, layer) for c, fn in cands.items()}
    diffs = {}
    out["w4 up_proj dense"] = out["w4 up_proj dense"][:, layer["idx"]]
    for kind in ("fp32", "w4", "w4 up_proj", "w4 down_proj"):
        dense, sparse = out[f"{kind} dense"], out[f"{kind} sparse"]
        diffs[kind] = float((sparse - dense).abs().max() / dense.abs().max())
    return diffs


def block_sparse_rows(repeats: int, gen: torch.Generator) -> list[dict]:
    """Dense vs block-sparse time of one 1536 × 384 linear with half its blocks zeroed, and of
    the block-sparse kernel on the unpruned weight."""
    x = torch.randn(32 * 65, 384, generator=gen)
    rows = []
    for block in (16, 32):
        full = torch.nn.Linear(384, 1536)
        linear = torch.nn.Linear(384, 1536)
        with torch.no_grad():
            blocks = torch.rand(1536 // block, 384 // block, generator=gen) < 0.5
            mask = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)
            linear.weight.copy_(full.weight * mask)
            linear.bias.copy_(full.bias)
        sparse = BlockSparseLinear(linear, (block, block))
        all_kept = BlockSparseLinear(full, (block, block))
        cands = {"dense": linear, "sparse": sparse, "all kept": all_kept}
        with torch.inference_mode():
            diff = float((sparse(x) - linear(x)).abs().max() / linear(x).abs().max())
            times: dict[str, list[float]] = {name: [] for name in cands}
            for _ in range(repeats):
                for name, fn in cands.items():
                    start = time.perf_counter()
                    for _ in range(10):
                        fn(x)
                    times[name].append((time.perf_counter() - start) / 10)
        us = {name: statistics.median(t) * 1e6 for name, t in times.items()}
        rows.append({"weights": f"block-sparse {block}x{block}", "kept": sparse.kept_fraction,
                     "dense_us": us["dense"], "sparse_us": us["sparse"],
                     "speedup": us["dense"] / us["sparse"], "all_kept_us": us["all kept"],
                     "speedup_over_all_kept": us["all kept"] / us["sparse"],
                     "max_rel_diff": diff})  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=120, help="distinct weights cycled through")
    p.add_argument("--active", type=float, default=0.5, help="fraction of channels nonzero")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--inner", type=int, default=5, help="passes over the layers per sample")
    p.add_argument("--json", help="also write the raw figures here")
    args = p.parse_args()
    if not 0 < args.active <= 1:
        p.error(f"--active must be in (0, 1], got {args.active}")
    if load_ops() is None:
        raise SystemExit("the C++ extension did not build: the sparse kernels would time torch")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    layers = [make_layer(args.active, gen) for _ in range(args.layers)]
    x = torch.randn(1, HIDDEN, generator=gen)
    cands = candidates()
    with torch.inference_mode():
        diffs = check(x, layers[0], cands)
        for fn in cands.values():
            seconds_per_mlp(fn, x, layers, 1)  # warm-up
        samples: dict[str, list[float]] = {c: [] for c in cands}
        for _ in range(args.repeats):
            for c, fn in cands.items():
                samples[c].append(seconds_per_mlp(fn, x, layers, args.inner))
    us = {c: statistics.median(s) * 1e6 for c, s in samples.items()}
    rows = []
    print(f"{args.layers} MLPs, {args.active:.0%} active, {args.threads} thread(s); µs per MLP")
    for kind in ("fp32", "w4", "w4 up_proj", "w4 down_proj"):
        dense, sparse = us[f"{kind} dense"], us[f"{kind} sparse"]
        row = {"weights": kind, "dense_us": dense, "sparse_us": sparse,
               "speedup": dense / sparse, "max_rel_diff": diffs[kind]}  # fmt: skip
        rows.append(row)
        print(f"{kind:12s} dense {dense:8.1f}  sparse {sparse:8.1f}  {dense / sparse:5.2f}×  "
              f"(max rel. diff {diffs[kind]:.1e})")  # fmt: skip
    for row in block_sparse_rows(args.repeats, gen):
        rows.append(row)
        print(f"{row['weights']} ({row['kept']:.0%} kept, 2080 rows): dense {row['dense_us']:.0f}  "
              f"sparse {row['sparse_us']:.0f}  {row['speedup']:.2f}×; same kernel, every block "
              f"kept {row['all_kept_us']:.0f}: {row['speedup_over_all_kept']:.2f}×  "
              f"(max rel. diff {row['max_rel_diff']:.1e})")  # fmt: skip
    if args.json:
        common.write_raw(args.json, rows, command="python benchmarks/sparse_kernels.py",
                         layers=args.layers, active=args.active, repeats=args.repeats)  # fmt: skip


if __name__ == "__main__":
    main()
