"""What every ``benchmarks/*_smollm2.py`` script shares: options, the run, the printed report.

A script builds its list of recipes (preset names or ``Recipe`` variants built in code) and calls
:func:`run` then :func:`report` (or :func:`main` for both); the loop itself is
``channelwise.compare.compare`` — fp first, a fresh model per recipe, every Δ% against the fp of
the same run — and the tables are ``channelwise.report``'s, as for ``channelwise compare``.

Common options: ``--samples N`` (the first N of the protocol's 128 calibration samples; alias
``--calib-samples``), ``--recipes a,b,c`` (where the script takes a list), ``--device``,
``--threads``, ``--json out.json`` and ``--windows`` (fewer evaluation windows: smoke checks only,
never a reported figure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Sequence

import torch

from channelwise.compare import ComparisonRow, OnRow, compare
from channelwise.compress import CompressionResult
from channelwise.models import resolve_device
from channelwise.paths import write_atomic
from channelwise.protocol import Protocol
from channelwise.recipe import Recipe, load_recipe
from channelwise.report import format_markdown, write_json


def parser(doc: str, recipes: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The shared options; ``--recipes`` (defaulting to ``recipes``) only when given a list."""
    p = argparse.ArgumentParser(
        description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--samples", "--calib-samples", type=int, help="first N calibration samples")
    if recipes is not None:
        p.add_argument("--recipes", default=",".join(recipes), help="comma-separated presets")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, help="torch threads (1 on a shared machine)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--windows", type=int, help="evaluation windows (fewer: smoke checks only)")
    return p


def recipe_names(args: argparse.Namespace) -> list[str]:
    """``--recipes`` split on commas, blanks dropped."""
    return [name.strip() for name in args.recipes.split(",") if name.strip()]


def protocol(args: argparse.Namespace) -> Protocol:
    """The benchmark protocol, with ``--samples`` / ``--windows`` when given."""
    return Protocol().with_(calib_samples=args.samples, windows=args.windows)


def print_row(row: ComparisonRow, result: CompressionResult | None = None) -> None:
    """One progress line per measured recipe."""
    print(
        f"{row.recipe:<36} {row.bits:<10} ppl {row.ppl:8.3f}  Δ {row.delta_pct:+7.2f}%  "
        f"calib {row.calib_s:7.1f}s {row.calib_peak_mb:6.0f} MB  eval {row.eval_s:6.1f}s",
        flush=True,
    )


def run(
    args: argparse.Namespace, recipes: Sequence[str | Recipe], on_row: OnRow | None = None
) -> list[ComparisonRow]:
    """Measure ``recipes`` (fp added first if missing), printing a line as each row lands."""
    if args.threads:
        torch.set_num_threads(args.threads)

    def each(row: ComparisonRow, result: CompressionResult | None) -> None:
        print_row(row, result)
        if on_row is not None:
            on_row(row, result)

    return compare(list(recipes), protocol=protocol(args), progress=False, device=args.device,
                   on_row=each)  # fmt: skip


def report(args: argparse.Namespace, rows: list[ComparisonRow], extra: dict | None = None) -> None:
    """The device/torch/threads header, the Markdown table, and ``--json`` (rows + meta)."""
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    used = protocol(args)
    print(
        f"\ndevice: {device} ({name or platform.machine()}), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}\ncalibration ({used.calib_samples}, {used.seqlen}) "
        f"from {used.calib_data}; eval ({used.windows}, {used.seqlen}) from {used.eval_data}\n"
    )
    print(format_markdown(rows))
    if args.json:
        meta = {"device": str(device), "samples": used.calib_samples, "windows": used.windows}
        print(f"wrote {write_json(rows, args.json, {**meta, **(extra or {})})}")


def main(args: argparse.Namespace, recipes: Sequence[str | Recipe]) -> list[ComparisonRow]:
    """:func:`run` then :func:`report`."""
    rows = run(args, recipes)
    report(args, rows)
    return rows


def variant(preset: str, name: str, description: str, **changes) -> Recipe:
    """``preset`` with some of its fields replaced, under a new name: a recipe that is not a
    preset, built where a script needs it."""
    fields = load_recipe(preset).model_dump(exclude_unset=True)
    return Recipe.model_validate({**fields, "name": name, "description": description, **changes})


def fp_baseline(args: argparse.Namespace):
    """Threads set, the float model scored: ``(protocol, tokenizer, ppl, fp)``, where
    ``ppl(model)`` is a model's perplexity on the protocol's evaluation windows."""
    from channelwise.evaluate import perplexity
    from channelwise.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    protocol_ = protocol(args)
    model, tokenizer = load_model(device=args.device)
    windows = protocol_.eval_tokens(tokenizer)

    def ppl(m) -> float:
        return perplexity(m, windows, progress=False)

    fp = ppl(model)
    print(f"fp {fp:.3f}", flush=True)
    return protocol_, tokenizer, ppl, fp


def write_raw(path: str, rows: list[dict], **meta) -> None:
    """A script's raw output: ``meta``, the machine, torch and its threads, then ``rows``."""
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    payload = {**meta, "machine": machine, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "rows": rows}  # fmt: skip
    write_atomic(path, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
