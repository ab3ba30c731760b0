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
