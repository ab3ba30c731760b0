"""Jane Austen's six novels, taken from the Debian package ``r-cran-janeaustenr`` (MIT).

The package is fetched once (``data.debian``: ``apt-get download``, never installed, unpacked
with ``dpkg -x``), and its R data files are decoded with ``rdata``. Each novel is cached as UTF-8
text under ``<channelwise_home>/data/austen/<name>.txt``.
"""

import gzip
import tempfile
import warnings
import zlib
from pathlib import Path

from channelwise.data.debian import DebianPackage, unpacked_package
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

JANEAUSTENR = DebianPackage(
    "r-cran-janeaustenr", env="CHANNELWISE_JANEAUSTENR_DEB", what="the Austen novels"
)
DEB_ENV = JANEAUSTENR.env


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
    """The package's R ``data`` folder, from ``$CHANNELWISE_JANEAUSTENR_DEB`` or a download."""
    return _find_data_dir(unpacked_package(JANEAUSTENR, work))


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
