"""Every preset on a tiny random model of every text family: works, or refused with its reason.

For each family of ``channelwise.tiny.FAMILIES`` (hidden 128, 2 blocks, random weights, random
calibration ids) and each preset, :func:`channelwise.tiny.preset_trial` compresses the model and
reports the relative logit error against the float model (for a KV-cache recipe, the relative
change of the NLL read through its cache), whether a packed save reloads with identical logits,
or the one-line reason a preset is refused. Random tiny models say nothing about quality: the
error column only shows the recipe ran end to end. A "failed" cell is a bug.

    .venv/bin/python benchmarks/family_presets.py [--families qwen3,phi3] [--presets a,b]
        [--json docs/runs/family-presets.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from channelwise.paths import write_atomic
from channelwise.recipe import preset_names
from channelwise.tiny import FAMILIES, preset_trial


def cell(trial) -> str:
    if trial.status == "ok":
        packed = {None: "", True: ", packed ✓", False: ", packed ✗"}[trial.packed]
        return f"ok ({trial.error:.3f}{packed})"
    return trial.status


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--presets", default=",".join(preset_names()))
    p.add_argument("--json", help="write the trials here")
    args = p.parse_args()
    torch.set_num_threads(1)
    families = [f for f in args.families.split(",") if f]
    presets = [name for name in args.presets.split(",") if name]
    trials = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            for preset in presets:
                trial = preset_trial(family, preset, Path(tmp) / f"{family}-{preset}")
                trials.append(trial)
                print(f"{family:12} {preset:34} {cell(trial):28} {trial.reason}", flush=True)
    by = {(t.family, t.preset): t for t in trials}
    print("\n| preset | " + " | ".join(families) + " |")
    print("|---|" + "---|" * len(families))
    for preset in presets:
        print(f"| {preset} | " + " | ".join(cell(by[f, preset]) for f in families) + " |")
    reasons = sorted({t.reason for t in trials if t.status != "ok"})
    print("\nReasons:\n" + "\n".join(f"- {r}" for r in reasons))
    failed = [t for t in trials if t.status == "failed"]
    print(f"\n{len(trials)} trials, {len(failed)} failed, {time.perf_counter() - start:.0f} s")
    if args.json:
        meta = {"torch": torch.__version__, "machine": platform.machine(), "threads": 1}
        rows = [t.__dict__ for t in trials]
        write_atomic(args.json, json.dumps({"_meta": meta, "trials": rows}, indent=1))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
