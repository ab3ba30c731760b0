"""Output safety: ``--force`` replaces only what channelwise wrote, writes are staged and
renamed, and a failed write is one line with nothing left behind (channelwise.paths)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from channelwise.cli import main
from channelwise.errors import OutputExistsError, OutputPathError
from channelwise.paths import (
    OUTPUT_MARKER,
    check_replaceable,
    staged_file,
    staged_folder,
    write_atomic,
)


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def run(capsys, *argv):
    code = main(["-q", *argv])
    return code, capsys.readouterr().err


def test_force_on_the_working_directory_is_refused_and_deletes_nothing(
    capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "project"
    work.mkdir()
    (work / "notes.txt").write_text("precious")
    (work / "src").mkdir()
    (work / "src" / "main.py").write_text("print(1)")
    monkeypatch.chdir(work)
    before = contents(work)
    for out in (".", str(work), str(tmp_path)):
        code, err = run(capsys, "quantize", "--recipe", "rtn-w8a16", "--out", out, "--force")
        assert code == 2 and "error: " in err and "Traceback" not in err
    assert contents(work) == before


def test_force_replaces_only_a_marked_or_empty_folder(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"x")
    with pytest.raises(OutputExistsError, match="--force replaces only"):
        check_replaceable(foreign, force=True)
    with pytest.raises(OutputExistsError, match="pass --force"):
        check_replaceable(foreign, force=False)
    (foreign / OUTPUT_MARKER).write_text("")
    check_replaceable(foreign, force=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    check_replaceable(empty, force=True)
    check_replaceable(tmp_path / "absent", force=False)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        check_replaceable(a_file, force=True)


def test_force_replaces_only_a_gguf_file(tmp_path: Path) -> None:
    folder = tmp_path / "x.gguf"
    folder.mkdir()
    with pytest.raises(OutputExistsError, match="a folder"):
        check_replaceable(folder, force=True, kind="gguf")
    other = tmp_path / "y.gguf"
    other.write_bytes(b"not a gguf")
    with pytest.raises(OutputExistsError, match="not a GGUF file"):
        check_replaceable(other, force=True, kind="gguf")
    other.write_bytes(b"GGUF\x03\x00\x00\x00")
    check_replaceable(other, force=True, kind="gguf")


def test_cli_gguf_out_on_a_folder_is_refused_before_any_work(capsys, tmp_path: Path) -> None:
    folder = tmp_path / "x.gguf"
    folder.mkdir()
    (folder / "keep").write_text("mine")
    code, err = run(
        capsys, "quantize", "--recipe", "rtn-w4a16-q4_0", "--format", "gguf",
        "--out", str(folder), "--force",
    )  # fmt: skip
    assert code == 2 and "a folder" in err.strip().splitlines()[-1]
    assert contents(folder) == {"keep": b"mine"}


def test_staged_folder_marks_and_replaces(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with staged_folder(out) as tmp:
        (tmp / "a").write_text("1")
    assert contents(out) == {"a": b"1", OUTPUT_MARKER: (out / OUTPUT_MARKER).read_bytes()}
    with staged_folder(out) as tmp:
        (tmp / "b").write_text("2")
    assert set(contents(out)) == {"b", OUTPUT_MARKER}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_old_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with staged_folder(out) as tmp:
        (tmp / "old").write_text("kept")
    before = contents(out)
    with pytest.raises(OutputPathError, match="No space left on device"):
        with staged_folder(out) as tmp:
            (tmp / "half").write_text("partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert contents(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no temporary folder left"


def test_a_failed_rename_puts_the_old_output_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    with staged_folder(out) as tmp:
        (tmp / "old").write_text("kept")
    before = contents(out)
    real_rename = Path.rename

    def rename(self: Path, target):
        if Path(target) == out and ".tmp" in self.name:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OutputPathError, match="could not write"):
        with staged_folder(out) as tmp:
            (tmp / "new").write_text("x")
    assert contents(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_save_that_fails_on_disk_is_one_line(
    make_tiny_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from channelwise import compress
    from channelwise.compress import quantize, save_quantized
    from channelwise.deploy import pack_model

    model = make_tiny_model("llama")
    quantize(model, "rtn-w8a16", progress=False)
    pack_model(model)

    def full_disk(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(compress, "save_packed_weights", full_disk)
    with pytest.raises(OutputPathError, match="could not write .*No space left"):
        save_quantized(model, None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_staged_file_and_write_atomic_leave_only_the_target(tmp_path: Path) -> None:
    target = tmp_path / "novel.txt"
    write_atomic(target, "Line one\nLine two \u2014 end")
    assert target.read_text(encoding="utf-8") == "Line one\nLine two \u2014 end"
    with pytest.raises(OutputPathError, match="could not write"):
        with staged_file(target) as tmp:
            tmp.write_text("partial")
            raise OSError(errno.EIO, os.strerror(errno.EIO))
    assert target.read_text(encoding="utf-8").startswith("Line one")
    assert [p.name for p in tmp_path.iterdir()] == ["novel.txt"]


def test_staged_file_gives_the_umask_mode(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        path = write_atomic(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640
