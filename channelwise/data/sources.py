"""Resolve a data-source name (Austen novel, local file or folder, hub corpus) to plain text."""

from collections.abc import Callable
from pathlib import Path

from channelwise.data.austen import AUSTEN_NOVELS, austen_text
from channelwise.errors import DataSourceError

WIKITEXT_SPLITS = ("train", "validation", "test")
_C4_SHARD = "en/c4-validation.00000-of-00008.json.gz"
_OFFLINE_HINT = (
    f"the embedded Austen novels ({', '.join(AUSTEN_NOVELS)}) "
    "or a local text file/folder work offline"
)


def load_text(source: str, split: str = "test") -> str:
    """Return the text of ``source``; ``split`` applies to wikitext-2 only."""
    key = source.strip().lower()
    if key in AUSTEN_NOVELS:
        return austen_text(key)
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_folder(path)
    if path.is_file():
        return _read_file(path)
    loader = _HUB_CORPORA.get(key)
    if loader is not None:
        return loader(split)
    raise DataSourceError(
        f"data source {source!r} is neither a known name nor an existing file or folder "
        f"({path.resolve()} does not exist); accepted: {_accepted_summary()}"
    )


def source_identity(source: str, split: str = "test") -> frozenset[str]:
    """What ``source`` reads, as comparable keys: the resolved path of every file it reads (an
    Austen novel is its cache file), or ``hub:<corpus>:<split>`` for a hub corpus (wikitext-2's
    train and test splits are different texts; c4 and pile-val read one split whatever is
    asked). Two sources overlap when their identities intersect. Unknown sources give the empty
    set (:func:`load_text` names the problem when it is read)."""
    from channelwise.data.austen import austen_folder

    key = source.strip().lower()
    if key in AUSTEN_NOVELS:
        return frozenset({str((austen_folder() / f"{key}.txt").resolve())})
    path = Path(source).expanduser()
    if path.is_dir():
        return frozenset(str(p.resolve()) for p in path.rglob("*.txt") if p.is_file())
    if path.is_file():
        return frozenset({str(path.resolve())})
    loader = _HUB_CORPORA.get(key)
    if loader is None:
        return frozenset()
    corpus = "wikitext2" if loader is _wikitext2 else key
    return frozenset({f"hub:{corpus}:{split if loader is _wikitext2 else 'validation'}"})


def describe_sources() -> str:
    """Describe the accepted data-source forms, for CLI help."""
    return (
        f"Austen novel ({', '.join(AUSTEN_NOVELS)}; offline, fetched once from Debian); "
        "a UTF-8 text file; a folder (every *.txt below it, sorted); "
        "or a Hugging Face corpus needing the 'datasets' package and network: "
        "wikitext2 (test split for evaluation, train for calibration), "
        "c4 (allenai/c4 en validation shard 0), pile-val (mit-han-lab/pile-val-backup)"
    )


def _accepted_summary() -> str:
    """Return a one-line list of accepted forms for error messages."""
    names = ", ".join((*AUSTEN_NOVELS, "wikitext2", "c4", "pile-val"))
    return f"{names}, a text file, or a folder of .txt files"


def _read_file(path: Path) -> str:
    """Read one UTF-8 text file."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataSourceError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc
    except OSError as exc:
        raise DataSourceError(f"could not read {path} ({exc.strerror or exc})") from exc


def _read_folder(folder: Path) -> str:
    """Concatenate every ``*.txt`` below ``folder`` in sorted order, separated by blank lines."""
    files = sorted(p for p in folder.rglob("*.txt") if p.is_file())
    if not files:
        raise DataSourceError(
            f"folder {folder} contains no .txt files; add some or name a text file"
        )
    return "\n\n".join(_read_file(p) for p in files)


def _load_hub(name: str, split: str, *args: str, **kwargs: object) -> str:
    """Load a Hugging Face dataset split and join its ``text`` column with blank lines."""
    try:
        import datasets
    except ImportError as exc:
        raise _unreachable(name, "the 'datasets' package is not installed") from exc
    try:
        dataset = datasets.load_dataset(*args, split=split, **kwargs)
        texts = dataset["text"]
    except Exception as exc:
        raise _unreachable(name, _first_line(exc)) from exc
    return "\n\n".join(texts)


def _wikitext2(split: str) -> str:
    """Load wikitext-2-raw-v1 (``test`` for evaluation, ``train`` for calibration)."""
    if split not in WIKITEXT_SPLITS:
        raise DataSourceError(
            f"wikitext2 has no split {split!r}; expected one of: {', '.join(WIKITEXT_SPLITS)}"
        )
    return _load_hub("wikitext2", split, "wikitext", "wikitext-2-raw-v1")


def _c4(split: str) -> str:
    """Load the first shard of allenai/c4 English validation (``split`` is ignored)."""
    del split
    return _load_hub("c4", "validation", "allenai/c4", data_files={"validation": _C4_SHARD})


def _pile_val(split: str) -> str:
    """Load mit-han-lab/pile-val-backup validation (``split`` is ignored)."""
    del split
    return _load_hub("pile-val", "validation", "mit-han-lab/pile-val-backup")


def _unreachable(name: str, reason: str) -> DataSourceError:
    """Build the error for a hub corpus that cannot be loaded."""
    return DataSourceError(f"could not reach dataset {name!r} ({reason}); {_OFFLINE_HINT}")


def _first_line(exc: BaseException) -> str:
    """Summarize an exception on one short line."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    summary = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return summary if len(summary) <= 200 else summary[:197] + "..."


_HUB_CORPORA: dict[str, Callable[[str], str]] = {
    "wikitext2": _wikitext2,
    "wikitext-2": _wikitext2,
    "c4": _c4,
    "pile-val": _pile_val,
}
