"""Where channelwise keeps downloaded and derived files, and how it writes outputs.

Every output goes through :func:`staged_folder` or :func:`staged_file`: it is written under a
temporary sibling name and renamed into place, so an interrupted or failed write leaves nothing
half-written and never destroys what was there. ``--force`` replaces only what channelwise
itself wrote (:func:`check_replaceable`).
"""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from channelwise.errors import OutputExistsError, OutputPathError

#: Written into every output folder, so ``--force`` can tell a folder channelwise wrote.
OUTPUT_MARKER = ".channelwise-output"
#: A packed or fake-quant folder written before :data:`OUTPUT_MARKER` existed carries this.
_LEGACY_MARKER = "channelwise.json"
_GGUF_MAGIC = b"GGUF"


def channelwise_home() -> Path:
    """Return the cache root (``$CHANNELWISE_HOME`` or ``~/.cache/channelwise``), creating it."""
    configured = os.environ.get("CHANNELWISE_HOME")
    home = Path(configured).expanduser() if configured else Path.home() / ".cache" / "channelwise"
    home.mkdir(parents=True, exist_ok=True)
    return home


def output_folder(out_dir: str | os.PathLike, model: object, force: bool) -> Path:
    """``out_dir`` resolved, after refusing the folder holding ``model``'s own files (its
    ``name_or_path``) and an existing path that ``force`` may not replace."""
    out = Path(out_dir).expanduser().resolve()
    name = str(getattr(model, "name_or_path", "") or "")
    source = Path(name).expanduser()  # "" (a model built from a config) names no folder
    if (
        name
        and source.exists()
        and (out.is_relative_to(source.resolve()) or source.resolve().is_relative_to(out))
    ):
        raise OutputExistsError(
            f"refusing to write into {out}: it holds or is inside the input model"
        )
    check_replaceable(out, force)
    return out


def check_replaceable(out: Path, force: bool, kind: str = "folder") -> None:
    """Refuse an existing ``out`` unless ``force`` is given and ``out`` is what channelwise
    writes: for ``kind="folder"`` an empty folder or one holding channelwise's marker file; for
    ``kind="gguf"`` a GGUF file. Anything else (the working directory, a file, another tool's
    folder) is never replaced, whatever ``force`` says."""
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise OutputExistsError(f"{out} exists; choose another --out or pass --force to replace it")
    if kind == "gguf":
        if out.is_file() and not out.is_symlink() and _starts_with(out, _GGUF_MAGIC):
            return
        raise OutputExistsError(
            f"--force replaces only a GGUF file, and {out} is "
            f"{'a folder' if out.is_dir() else 'not a GGUF file'}; choose another --out"
        )
    if out.is_symlink() or not out.is_dir():
        kind = "a symbolic link" if out.is_symlink() else "a file"
        raise OutputExistsError(
            f"--force replaces only a folder channelwise wrote, and {out} is {kind}; "
            "choose another --out"
        )
    if Path.cwd().resolve().is_relative_to(out):
        raise OutputExistsError(f"refusing to replace {out}: it holds the working directory")
    if not written_by_channelwise(out) and any(out.iterdir()):
        raise OutputExistsError(
            f"--force replaces only an empty folder or one channelwise wrote (with its "
            f"{OUTPUT_MARKER} file), and {out} is neither; choose another --out"
        )


def written_by_channelwise(folder: Path) -> bool:
    """Whether ``folder`` holds the marker channelwise writes into every output folder."""
    return (folder / OUTPUT_MARKER).is_file() or (folder / _LEGACY_MARKER).is_file()


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(len(magic)) == magic
    except OSError:
        return False


def permit_as_umask(folder: Path) -> None:
    """Give every file under ``folder`` the mode a plain ``open`` would (``0o666`` less the
    umask): safetensors writes through a private temporary file, which leaves mode 0600, so a
    server running as another user could not read an exported model."""
    mode = _umask_file_mode()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def _umask_file_mode() -> int:
    """``0o666`` less the process umask: the mode a plain ``open`` gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def check_output_file(path: str | os.PathLike, suffixes: tuple[str, ...], *inputs) -> Path:
    """``path`` resolved, checked before any work: it ends in one of ``suffixes``, is not a
    folder, lies in a folder that exists or can be created, and is not inside any of ``inputs``
    (the model, recipe files, data sources: a report must never replace or join an input)."""
    out = Path(path).expanduser().resolve()
    if out.suffix.lower() not in suffixes:
        raise OutputPathError(f"{path}: expected a file ending in {' or '.join(suffixes)}")
    if out.is_dir():
        raise OutputPathError(f"{path} is a folder; give a file path")
    for source in filter(None, inputs):
        folder = Path(str(source)).expanduser()
        if folder.exists() and out.is_relative_to(folder.resolve()):
            raise OutputPathError(f"refusing to write {path} over or inside the input {source}")
    check_parent_writable(out)
    return out


def check_parent_writable(out: Path) -> None:
    """The nearest existing ancestor of ``out`` must be a folder this process can write."""
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"cannot write {out}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {out}: {ancestor} is not writable")


def _write_failed(out: Path, exc: BaseException) -> OutputPathError:
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    reason = getattr(exc, "strerror", None) or lines[-1]
    return OutputPathError(f"could not write {out}: {reason}; nothing was written there")


def _write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write raises: ``OSError``, or safetensors' own error (a full disk)."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        return (OSError,)
    return (OSError, SafetensorError)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an old ``out`` is moved aside first and removed only once the
    new one is in place (put back if the second rename fails)."""
    if not out.exists() and not out.is_symlink():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    _remove(old)
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    _remove(old)


@contextmanager
def staged_folder(out: Path, marker: bool = True) -> Iterator[Path]:
    """Yield a new empty temporary sibling of ``out`` to fill; on success it replaces ``out``,
    on failure it is deleted and ``out`` is left as it was. A write failure (full disk, failed
    rename) is an :class:`OutputPathError`. ``marker`` writes :data:`OUTPUT_MARKER` into it."""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
        tmp.mkdir()
        yield tmp
        if marker:
            (tmp / OUTPUT_MARKER).write_text("written by channelwise; --force may replace it\n")
        permit_as_umask(tmp)
        _swap_into_place(tmp, out)
    except _write_errors() as exc:
        _remove(tmp)
        raise _write_failed(out, exc) from None
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it is renamed over ``path``
    (with the umask's mode), on failure removed. A write failure is an :class:`OutputPathError`."""
    path = Path(path).expanduser()
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        tmp.chmod(_umask_file_mode())
        os.replace(tmp, path)
    except _write_errors() as exc:
        tmp.unlink(missing_ok=True)
        raise _write_failed(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through :func:`staged_file`; return ``path``."""
    path = Path(path).expanduser()
    with staged_file(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path
