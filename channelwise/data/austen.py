"""Jane Austen's six novels, taken from the Debian package ``r-cran-janeaustenr`` (MIT).

The package is fetched once with ``apt-get download`` (never installed), unpacked with
``dpkg -x``, and its R data files are decoded with ``rdata``. Each novel is cached as UTF-8 text
under ``<channelwise_home>/data/austen/<name>.txt``.
"""

import gzip
import os
import shutil
import subprocess
import tempfile
import warnings
import zlib
from pathlib import Path

from channelwise.errors import DataSourceError
from channelwise.paths import channelwise_home

AUSTEN_NOVELS: tuple[str, ...] = (
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
)

PACKAGE = "r-cran-janeaustenr"
DEB_ENV = "CHANNELWISE_JANEAUSTENR_DEB"
_APT_TIMEOUT_S = 300
_FALLBACK_HINT = f"download {PACKAGE}_*.deb from packages.debian.org and set {DEB_ENV} to its path"


def austen_folder() -> Path:
    """Return the folder where the novels are cached (it may not be filled yet)."""
    return channelwise_home() / "data" / "austen"


def ensure_austen() -> Path:
    """Cache all six novels (fetching the Debian package if needed) and return the folder."""
    folder = austen_folder()
    if all((folder / f"{name}.txt").is_file() for name in AUSTEN_NOVELS):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="channelwise-austen-") as tmp:
        work = Path(tmp)
        novels = _read_novels(_package_data_dir(work))
    for name, text in novels.items():
        _write_atomic(folder / f"{name}.txt", text)
    return folder


def austen_text(name: str) -> str:
    """Return the full text of one novel, one of :data:`AUSTEN_NOVELS`."""
    key = name.strip().lower()
    if key not in AUSTEN_NOVELS:
        raise DataSourceError(
            f"unknown Austen novel {name!r}; expected one of: {', '.join(AUSTEN_NOVELS)}"
        )
    return (ensure_austen() / f"{key}.txt").read_text(encoding="utf-8")


def _package_data_dir(work: Path) -> Path:
    """Return the package's ``data`` folder, from ``$CHANNELWISE_JANEAUSTENR_DEB`` or a download."""
    configured = os.environ.get(DEB_ENV)
    if configured:
        source = Path(configured).expanduser()
        if source.is_dir():
            return _find_data_dir(source)
        if not source.is_file():
            raise DataSourceError(
                f"{DEB_ENV}={configured} is neither a .deb file nor an extracted package folder"
            )
        deb = source
    else:
        deb = _download_deb(work)
    return _find_data_dir(_extract_deb(deb, work / "extracted"))


def _download_deb(work: Path) -> Path:
    """Fetch the package's .deb into ``work`` with ``apt-get download``."""
    if shutil.which("apt-get") is None:
        raise DataSourceError(
            f"apt-get not found, so the Austen novels cannot be fetched; {_FALLBACK_HINT}"
        )
    work.chmod(0o777)
    result = _run(["apt-get", "download", PACKAGE], work)
    if result.returncode != 0:
        update = _run(["apt-get", "update"], work)
        if update.returncode != 0:
            raise DataSourceError(
                f"apt-get download {PACKAGE} failed and apt-get update failed too "
                f"({_last_line(update.stderr)}); check the network or run as root, "
                f"or {_FALLBACK_HINT}"
            )
        result = _run(["apt-get", "download", PACKAGE], work)
    debs = sorted(work.glob("*.deb"))
    if result.returncode != 0 or not debs:
        raise DataSourceError(
            f"apt-get download {PACKAGE} failed ({_last_line(result.stderr)}); {_FALLBACK_HINT}"
        )
    return debs[0]


def _extract_deb(deb: Path, target: Path) -> Path:
    """Unpack ``deb`` into ``target`` with ``dpkg -x``."""
    if shutil.which("dpkg") is None:
        raise DataSourceError(
            f"dpkg not found, so {deb} cannot be unpacked; unpack it yourself "
            f"and point {DEB_ENV} at the extracted folder"
        )
    result = _run(["dpkg", "-x", str(deb), str(target)], deb.parent)
    if result.returncode != 0:
        raise DataSourceError(
            f"dpkg -x {deb} failed ({_last_line(result.stderr)}); is it a valid .deb?"
        )
    return target


def _find_data_dir(root: Path) -> Path:
    """Locate the folder holding ``Rdata.rdx``/``Rdata.rdb`` below ``root``."""
    for index in sorted(root.rglob("Rdata.rdx")):
        if (index.parent / "Rdata.rdb").is_file():
            return index.parent
    raise DataSourceError(f"no janeaustenr data (Rdata.rdx and Rdata.rdb) found under {root}")


def _read_novels(data_dir: Path) -> dict[str, str]:
    """Decode every novel from the package's lazy-load database."""
    index = _parse_r(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
    offsets = {str(key): value for key, value in index["variables"].items()}
    database = (data_dir / "Rdata.rdb").read_bytes()
    novels = {}
    for name in AUSTEN_NOVELS:
        if name not in offsets:
            raise DataSourceError(f"{data_dir} lacks the novel {name!r}; is it the right package?")
        start, length = (int(v) for v in offsets[name])
        block = database[start : start + length]
        lines = _parse_r(zlib.decompress(block[4:]))
        novels[name] = "\n".join(str(line) for line in lines)
    return novels


def _parse_r(raw: bytes) -> object:
    """Parse and convert one serialized R object with ``rdata``."""
    import rdata

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unknown file type")
            return rdata.conversion.convert(rdata.parser.parse_data(raw))
    except Exception as exc:
        raise DataSourceError(f"could not decode the janeaustenr R data ({exc})") from exc


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in ``cwd`` capturing output; a timeout or OS error is a DataSourceError."""
    try:
        return subprocess.run(
            command,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=_APT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataSourceError(
            f"{' '.join(command)} could not run ({exc}); {_FALLBACK_HINT}"
        ) from exc


def _last_line(stderr: str) -> str:
    """Return the last meaningful line of a tool's error output."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith("W:")]
    return (errors or lines or ["no error output"])[-1]
