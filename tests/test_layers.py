"""The package's layering: lower modules never import higher ones (no import cycles to dodge
with function-local imports). ``models`` may call ``compress.restore_quantized`` when it loads a
saved folder; nothing below ``compress`` imports it otherwise."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "channelwise"
LOWER = ["deploy", "kernels", "kvcache", "quant", "state.py", "paths.py", "errors.py"]


def imported_modules(path: Path) -> set[str]:
    """Every ``channelwise…`` module ``path`` imports, at top level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("channelwise")}


def files(part: str) -> list[Path]:
    where = PACKAGE / part
    return [where] if where.is_file() else sorted(where.rglob("*.py"))


@pytest.mark.parametrize("part", LOWER)
def test_lower_layers_never_import_compress(part: str) -> None:
    for path in files(part):
        assert "channelwise.compress" not in imported_modules(path), path


@pytest.mark.parametrize("leaf", ["state.py", "errors.py"])
def test_leaf_modules_import_nothing_of_the_package(leaf: str) -> None:
    assert imported_modules(PACKAGE / leaf) == set()


@pytest.mark.parametrize("module", ["channelwise.deploy.gguf", "channelwise.models"])
def test_each_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    run = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
