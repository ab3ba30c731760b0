"""Compressed KV caches (KIVI, RotateKV, K-sort BFP, CSKV) on the embedded SmolLM2-135M, with the
issue's goals checked against the measured rows.

Perplexity is read through each preset's cache (chunked prefill, ``channelwise.kvcache.evaluate``)
and the KV-bytes column is what the cache holds after 2,048 evaluation tokens against a float16
cache. Calibration (RotateKV's key order, CSKV's factors): ``Protocol().calibration_tokens``
(Emma); evaluation: Pride and Prejudice, 16 windows × 512::

    .venv/bin/python benchmarks/kv_smollm2.py                     # every preset, 128 samples
    .venv/bin/python benchmarks/kv_smollm2.py --recipes fp,kivi-kv4,kivi-kv2 --threads 1
    .venv/bin/python benchmarks/kv_smollm2.py --recipes fp,rotatekv-kv2,rotatekv-kv2-nosinks,\
rotatekv-kv2-noreorder,rotatekv-kv2-g32,cskv-50-kv4,cskv-k25-v75-kv4,kivi-kv2,kivi-kv2-r128

``--recipes`` also takes the ablation variants built here from a preset (``ABLATIONS``: RotateKV
without attention sinks, without the calibrated reorder, with 32-channel groups; CSKV with the
official code's 0.25/0.75 key/value split; KIVI with the paper's 128-token float window).
"""

from __future__ import annotations

import common  # benchmarks/common.py: this folder is on sys.path when run as a script

from channelwise.compare import ComparisonRow
from channelwise.recipe import KVCacheArgs, Recipe, load_recipe

RECIPES = (
    "fp",
    "kivi-kv4",
    "rotatekv-kv4",
    "kivi-kv2",
    "rotatekv-kv2",
    "kv_bfp",
    "cskv-50",
    "cskv-50-kv4",
)


#: Ablation variants: name → (preset, the cache arguments changed).
ABLATIONS = {
    "rotatekv-kv2-nosinks": ("rotatekv-kv2", {"sinks": 0}),
    "rotatekv-kv2-noreorder": ("rotatekv-kv2", {"reorder": False}),
    "rotatekv-kv2-g32": ("rotatekv-kv2", {"group_size": 32}),
    "cskv-k25-v75-kv4": ("cskv-50-kv4", {"density_k": 0.25, "density_v": 0.75}),
    "kivi-kv2-r128": ("kivi-kv2", {"residual": 128}),
}


def recipe(name: str) -> str | Recipe:
    """A preset name as is, or the ablation variant ``name`` built from its preset."""
    if name not in ABLATIONS:
        return name
    preset, changes = ABLATIONS[name]
    cache = load_recipe(preset).kv_cache
    cache = KVCacheArgs(method=cache.method, args={**cache.args, **changes})
    return common.variant(preset, name, f"{preset} with {changes}", kv_cache=cache)


def goals(rows: list[ComparisonRow]) -> list[str]:
    """The issue's goals, each with the measured figure and met / missed."""
    by = {row.recipe: row for row in rows}
    lines = []

    def check(what: str, ok: bool, figure: str) -> None:
        lines.append(f"{'met   ' if ok else 'missed'}  {what}: {figure}")

    kv4 = [by[n] for n in ("kivi-kv4", "rotatekv-kv4") if n in by]
    if kv4:
        best = min(kv4, key=lambda r: r.delta_pct)
        check(
            "KV4 (best method) ppl ≤ +2%",
            best.delta_pct <= 2,
            f"{best.recipe} {best.delta_pct:+.2f}%",
        )
    if "rotatekv-kv2" in by:
        r = by["rotatekv-kv2"]
        kivi = by.get("kivi-kv2")
        beats = kivi is None or r.ppl < kivi.ppl
        versus = "" if kivi is None else f" (KIVI-2 {kivi.delta_pct:+.2f}%)"
        check("KV2 RotateKV ≤ +8% and better than KIVI-2", r.delta_pct <= 8 and beats,
              f"{r.delta_pct:+.2f}%{versus}")  # fmt: skip
        check("cache bytes at KV2 ≤ 0.15× fp16", r.kv_ratio <= 0.15, f"{r.kv_ratio:.3f}×")
    if "cskv-50-kv4" in by:
        r = by["cskv-50-kv4"]
        check("CSKV 50% + KV4 ppl ≤ +10%, bytes ≤ 0.15×", r.delta_pct <= 10 and r.kv_ratio <= 0.15,
              f"{r.delta_pct:+.2f}%, {r.kv_ratio:.3f}×")  # fmt: skip
    return lines


def main() -> None:
    args = common.parser(__doc__, RECIPES).parse_args()
    rows = common.run(args, [recipe(name) for name in common.recipe_names(args)])
    common.report(args, rows)
    print("\n" + "\n".join(goals(rows)))


if __name__ == "__main__":
    main()
