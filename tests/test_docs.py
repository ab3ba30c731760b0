"""The figures in README come from a committed run, never typed by hand."""

from __future__ import annotations

import re
from pathlib import Path

from channelwise.report import format_markdown, read_json

ROOT = Path(__file__).resolve().parent.parent
RAW = ROOT / "docs" / "runs" / "results-table.json"


def test_readme_results_table_is_the_committed_run() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- results:begin -->\n(.*?)\n<!-- results:end -->", readme, re.S)
    assert found, "README lost its results markers"
    rows, meta = read_json(RAW)
    assert found.group(1) == format_markdown(rows), "run benchmarks/results_table.py --render"
    assert rows[0].recipe == "fp" and rows[0].delta_pct == 0.0
    assert meta["windows"] == 16 and meta["seqlen"] == 512 and meta["calib_data"] == "emma"


def test_readme_sentences_are_whole() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for paragraph in re.split(r"\n\s*\n", readme):
        text = paragraph.strip()
        if not text or text.startswith(("```", "|", "#", "<!--", "-", "*", "!")):
            continue
        assert text.endswith((".", ":", ")", "`", "*")), f"cut-off paragraph: …{text[-80:]}"


def test_readme_python_example_runs_and_saves_the_packed_format(
    make_tiny_model, tiny_tokenizer, tmp_path: Path, monkeypatch
) -> None:
    """The README's API block, run as written on a tiny Llama and two small local texts."""
    import json

    import torch

    import channelwise as cw
    from channelwise.deploy.packed import PackedLinear

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S)
    assert block, "README lost its Python API example"
    generator = torch.Generator().manual_seed(5)
    for name in ("calib", "eval"):
        ids = torch.randint(1, 128, (300,), generator=generator).tolist()
        (tmp_path / f"{name}.txt").write_text(" ".join(f"t{i}" for i in ids))
    small = cw.Protocol(
        calib_data=str(tmp_path / "calib.txt"), eval_data=str(tmp_path / "eval.txt"),
        seqlen=16, windows=2, start=0, calib_samples=2,
    )  # fmt: skip
    monkeypatch.setattr(
        cw, "load_model", lambda *a, **k: (make_tiny_model("llama"), tiny_tokenizer)
    )
    monkeypatch.setattr(cw, "Protocol", lambda: small)
    monkeypatch.chdir(tmp_path)
    exec(compile(block.group(1), "README.md", "exec"), {})
    saved = tmp_path / "out" / "w4a16-g64"
    assert json.loads((saved / "channelwise.json").read_text())["format"] == "packed"
    monkeypatch.undo()
    loaded, _ = cw.load_model(str(saved), device="cpu")
    assert any(isinstance(m, PackedLinear) for m in loaded.modules())
