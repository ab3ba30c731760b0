"""The README's results table: the `make bench` presets on the benchmark protocol, in one run.

    python benchmarks/results_table.py             # measure, then write the three outputs below
    python benchmarks/results_table.py --render    # README and chart from the committed run only

Writes the raw rows to ``docs/runs/results-table.json`` (with the machine, torch and protocol),
the chart to ``docs/results-table.png`` (perplexity against stored bits per weight), and the
Markdown table between ``<!-- results:begin -->`` and ``<!-- results:end -->`` in README.md —
the table is never typed by hand (``tests/test_docs.py`` checks README against the JSON).
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch
from common import parser, protocol, recipe_names, run

from channelwise.report import format_markdown, plot_comparison, read_json, write_json

ROOT = Path(__file__).resolve().parent.parent
RAW = ROOT / "docs" / "runs" / "results-table.json"
CHART = ROOT / "docs" / "results-table.png"
README = ROOT / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

RECIPES = (
    "fp,rtn-w8a16,rtn-w8a8,quarot-rtn-w8a8,rtn-w6a6,quarot-rtn-w6a6,rtn-w4a16-g64,"
    "awq-w4a16-g64,rtn-w3a16-g64,rtn-w4a8-g64,rtn-w4a4,quarot-rtn-w4a4"
).split(",")


def render_readme(readme: str, table: str) -> str:
    """``readme`` with the text between the result markers replaced by ``table``."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1:
        raise SystemExit(f"README must hold one {BEGIN} … {END} block")
    head, rest = readme.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main() -> None:
    p = parser(__doc__, RECIPES)
    p.add_argument("--render", action="store_true", help="only re-render README from the JSON")
    args = p.parse_args()
    if not args.render:
        rows = run(args, recipe_names(args))
        used = protocol(args)
        meta = {
            "command": "python " + " ".join(sys.argv),
            "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "calib_data": used.calib_data,
            "calib_samples": used.calib_samples,
            "eval_data": used.eval_data,
            "windows": used.windows,
            "seqlen": used.seqlen,
            "start": used.start,
        }
        write_json(rows, RAW, meta)
    rows, _ = read_json(RAW)
    plot_comparison(rows, CHART)
    README.write_text(render_readme(README.read_text(encoding="utf-8"), format_markdown(rows)))
    print(format_markdown(rows))
    print(f"wrote {README.relative_to(ROOT)} from {RAW.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
