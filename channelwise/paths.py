"""Where channelwise keeps downloaded and derived files."""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def channelwise_home() -> Path:
    """Return the cache root (``$CHANNELWISE_HOME`` or ``~/.cache/channelwise``), creating it."""
    configured = os.environ.get("CHANNELWISE_HOME")
    home = Path(configured).expanduser() if configured else Path.home() / ".cache" / "channelwise"
    home.mkdir(parents=True, exist_ok=True)
    return home


def output_folder(out_dir: str | os.PathLike, model: object, force: bool) -> Path:
    """``out_dir`` resolved, after refusing the folder holding ``model``'s own files (its
    ``name_or_path``) and an existing one without ``force``."""
    from channelwise.errors import OutputExistsError

    out = Path(out_dir).expanduser().resolve()
    source = Path(str(getattr(model, "name_or_path", "") or "")).expanduser()
    if source.exists() and (out == source.resolve() or source.resolve().is_relative_to(out)):
        raise OutputExistsError(f"refusing to write into {out}: it holds the input model")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; choose another --out or pass --force to replace it")
    return out


def permit_as_umask(folder: Path) -> None:
    """Give every file under ``folder`` the mode a plain ``open`` would (``0o666`` less the
    umask): safetensors writes through a private temporary file, which leaves mode 0600, so a
    server running as another user could not read an exported model."""
    mask = os.umask(0)
    os.umask(mask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~mask)


def check_output_file(path: str | os.PathLike, suffixes: tuple[str, ...], *inputs) -> Path:
    """``path`` resolved, checked before any work: it ends in one of ``suffixes``, is not a
    folder, lies in a folder that exists or can be created, and is not inside any of ``inputs``
    (model sources: a report must never replace a model's file)."""
    from channelwise.errors import OutputPathError

    out = Path(path).expanduser().resolve()
    if out.suffix.lower() not in suffixes:
        raise OutputPathError(f"{path}: expected a file ending in {' or '.join(suffixes)}")
    if out.is_dir():
        raise OutputPathError(f"{path} is a folder; give a file path")
    for source in filter(None, inputs):
        folder = Path(str(source)).expanduser()
        if folder.exists() and out.is_relative_to(folder.resolve()):
            raise OutputPathError(f"refusing to write {path} inside the input model {source}")
    check_parent_writable(out)
    return out


def check_parent_writable(out: Path) -> None:
    """The nearest existing ancestor of ``out`` must be a folder this process can write."""
    from channelwise.errors import OutputPathError

    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"cannot write {out}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {out}: {ancestor} is not writable")


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; on success it replaces ``out`` (an old
    ``out`` is removed only once the new one is in place), on failure it is deleted."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    permit_as_umask(tmp)
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    out.rename(old)
    tmp.rename(out)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()
