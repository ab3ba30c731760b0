"""Time GPTQ's inverse-Hessian factor: channelwise's ``inverse_cholesky`` against the paper's
route (Cholesky, ``cholesky_inverse``, Cholesky again), both in place, on the same float64
matrices, alternated within each size so a busy machine slows both alike.

The matrices are damped Gram matrices of correlated random inputs at the input widths of
SmolLM2 (576, 1536) and of 7B-class models (3584, 4096, 8192; a 7B ``down_proj`` reads 18,944).
Reported per size: the median seconds of each route over ``--repeats``, their ratio, and the
largest difference between the two factors relative to the factor's largest entry.

    .venv/bin/python benchmarks/gptq_inverse.py [--sizes 576,1536,4096] [--threads 1]
        [--repeats 3] [--json docs/runs/gptq-inverse-1thread.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import common  # benchmarks/common.py: this folder is on sys.path when run as a script
import torch

from channelwise.methods.gptq import inverse_cholesky


def paper_route(H: torch.Tensor, damp: float) -> torch.Tensor:
    """The GPTQ reference code's factor: ``chol(chol⁻¹(H + λI))`` upper, in ``H``'s memory."""
    diagonal = torch.diagonal(H)
    diagonal += damp * diagonal.mean()
    info = torch.empty((), dtype=torch.int32)
    torch.linalg.cholesky_ex(H, out=(H, info))
    torch.cholesky_inverse(H, out=H)
    torch.linalg.cholesky_ex(H, upper=True, out=(H, info))
    if info.item():
        raise SystemExit("the paper's route failed to factor the test matrix")
    return H


def hessian(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n + 256, n // 4, generator=gen, dtype=torch.float64)
    X = X @ torch.randn(n // 4, n, generator=gen, dtype=torch.float64)
    return X.T @ X / X.shape[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="576,1536,4096,8192")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        H = hessian(n, seed=n)
        times: dict[str, list[float]] = {"channelwise": [], "paper": []}
        for _ in range(args.repeats):
            for way, fn in (("paper", paper_route), ("channelwise", inverse_cholesky)):
                work = H.clone()
                start = time.perf_counter()
                factor = fn(work, args.damp) if way == "paper" else fn(work, args.damp, "bench")
                times[way].append(time.perf_counter() - start)
                if way == "paper":
                    reference = factor
                else:
                    difference = ((factor - reference).abs().max() / reference.abs().max()).item()
                del work, factor
        ours, paper = (statistics.median(times[k]) for k in ("channelwise", "paper"))
        row = {"n": n, "channelwise_s": ours, "paper_s": paper, "speedup": paper / ours}
        row.update(max_relative_difference=difference, seconds=times)
        rows.append(row)
        print(
            f"n={n:6d}  channelwise {ours:8.3f} s  paper {paper:8.3f} s  "
            f"{paper / ours:5.2f}×  max rel diff {difference:.1e}",
            flush=True,
        )
    if args.json:
        common.write_raw(args.json, rows, repeats=args.repeats, damp=args.damp)


if __name__ == "__main__":
    main()
