"""Jane Austen's six novels, taken from the Debian package ``r-cran-janeaustenr`` (MIT).

The package is fetched once with ``apt-get download`` (never installed), unpacked with
``dpkg -x``, and its R data files are decoded with ``rdata``. Each novel is cached as UTF-8 text
under ``<channelwise_home>/data/austen/<name>.txt``.
"""

import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
import zlib
from pathlib import Path

from channelwise.errors import DataSourceError
from channelwise.paths import channelwise_home, write_atomic

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
        write_atomic(folder / f"{name}.txt", text)
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
    """Fetch the package's .deb into the private folder ``work`` with ``apt-get download``.

    The file apt names (``--print-uris``: exact file name, size and SHA-256) is the only one read,
    and it is checked against that size and hash before it is unpacked. ``work`` stays private
    (0700): as root, apt then downloads unsandboxed, with a warning, instead of through a
    world-writable folder."""
    if shutil.which("apt-get") is None:
        raise DataSourceError(
            f"apt-get not found, so the Austen novels cannot be fetched; {_FALLBACK_HINT}"
        )
    listing = _run(["apt-get", "download", "--print-uris", PACKAGE], work)
    if listing.returncode != 0 or not _parse_uri_line(listing.stdout):
        update = _run(["apt-get", "update"], work)
        if update.returncode != 0:
            raise DataSourceError(
                f"apt-get download {PACKAGE} failed and apt-get update failed too "
                f"({_last_line(update.stderr)}); check the network or run as root, "
                f"or {_FALLBACK_HINT}"
            )
        listing = _run(["apt-get", "download", "--print-uris", PACKAGE], work)
    expected = _parse_uri_line(listing.stdout)
    if listing.returncode != 0 or expected is None:
        raise DataSourceError(
            f"apt-get does not know {PACKAGE} ({_last_line(listing.stderr)}); {_FALLBACK_HINT}"
        )
    name, size, sha256 = expected
    result = _run(["apt-get", "download", PACKAGE], work)
    deb = work / name
    if result.returncode != 0 or not deb.is_file():
        raise DataSourceError(
            f"apt-get download {PACKAGE} failed ({_last_line(result.stderr)}); {_FALLBACK_HINT}"
        )
    data = deb.read_bytes()
    if len(data) != size or (sha256 and hashlib.sha256(data).hexdigest() != sha256):
        raise DataSourceError(
            f"{name} does not match the size and SHA-256 apt announced; not unpacking it"
        )
    return deb


def _parse_uri_line(stdout: str) -> tuple[str, int, str] | None:
    """``(file name, size, sha256)`` from ``apt-get download --print-uris`` output
    (``'URI' NAME SIZE SHA256:HEX``), or None. The name must be a plain ``.deb`` file name."""
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[0].startswith("'"):
            continue
        name, size = parts[1], parts[2]
        if "/" in name or not name.startswith(f"{PACKAGE}_") or not name.endswith(".deb"):
            continue
        if not size.isdigit():
            continue
        hashes = [p.split(":", 1)[1].lower() for p in parts[3:] if p.startswith("SHA256:")]
        digest = hashes[0] if hashes else ""
        return name, int(size), digest
    return None


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
