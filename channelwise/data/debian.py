"""Fetching a Debian package's files without installing it: ``apt-get download`` + ``dpkg -x``.

The package is downloaded into a private (0700) temporary folder; only the exact file apt names
(``--print-uris``: file name, size, SHA-256) is read, and it is checked against that size and
hash before it is unpacked. An environment variable may point at a ``.deb`` or at an unpacked
folder instead (machines without apt).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from channelwise.errors import DataSourceError

_APT_TIMEOUT_S = 300


@dataclass(frozen=True)
class DebianPackage:
    """A package to read files from; ``env`` names the override variable."""

    name: str
    env: str
    what: str

    @property
    def hint(self) -> str:
        return f"download {self.name}_*.deb from packages.debian.org and set {self.env} to its path"


def unpacked_package(package: DebianPackage, work: Path) -> Path:
    """The root of the package's unpacked files: ``$env`` (a folder or a .deb) or a download
    into the private folder ``work``."""
    configured = os.environ.get(package.env)
    if configured:
        source = Path(configured).expanduser()
        if source.is_dir():
            return source
        if not source.is_file():
            raise DataSourceError(
                f"{package.env}={configured} is neither a .deb file nor an extracted package folder"
            )
        deb = source
    else:
        deb = download_deb(package, work)
    return extract_deb(package, deb, work / "extracted")


def download_deb(package: DebianPackage, work: Path) -> Path:
    """Fetch the package's .deb into the private folder ``work``, checked against apt's hash.

    ``work`` stays private (0700): as root, apt then downloads unsandboxed, with a warning,
    instead of through a world-writable folder."""
    if shutil.which("apt-get") is None:
        raise DataSourceError(
            f"apt-get not found, so {package.what} cannot be fetched; {package.hint}"
        )
    listing = _run(["apt-get", "download", "--print-uris", package.name], work, package)
    if listing.returncode != 0 or not parse_uri_line(listing.stdout, package.name):
        update = _run(["apt-get", "update"], work, package)
        if update.returncode != 0:
            raise DataSourceError(
                f"apt-get download {package.name} failed and apt-get update failed too "
                f"({_last_line(update.stderr)}); check the network or run as root, "
                f"or {package.hint}"
            )
        listing = _run(["apt-get", "download", "--print-uris", package.name], work, package)
    expected = parse_uri_line(listing.stdout, package.name)
    if listing.returncode != 0 or expected is None:
        raise DataSourceError(
            f"apt-get does not know {package.name} ({_last_line(listing.stderr)}); {package.hint}"
        )
    name, size, sha256 = expected
    result = _run(["apt-get", "download", package.name], work, package)
    deb = work / name
    if result.returncode != 0 or not deb.is_file():
        raise DataSourceError(
            f"apt-get download {package.name} failed ({_last_line(result.stderr)}); {package.hint}"
        )
    data = deb.read_bytes()
    if len(data) != size or (sha256 and hashlib.sha256(data).hexdigest() != sha256):
        raise DataSourceError(
            f"{name} does not match the size and SHA-256 apt announced; not unpacking it"
        )
    return deb


def parse_uri_line(stdout: str, package: str) -> tuple[str, int, str] | None:
    """``(file name, size, sha256)`` from ``apt-get download --print-uris`` output
    (``'URI' NAME SIZE SHA256:HEX``), or None. The name must be a plain ``.deb`` file name."""
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[0].startswith("'"):
            continue
        name, size = parts[1], parts[2]
        if "/" in name or not name.startswith(f"{package}_") or not name.endswith(".deb"):
            continue
        if not size.isdigit():
            continue
        hashes = [p.split(":", 1)[1].lower() for p in parts[3:] if p.startswith("SHA256:")]
        digest = hashes[0] if hashes else ""
        return name, int(size), digest
    return None


def extract_deb(package: DebianPackage, deb: Path, target: Path) -> Path:
    """Unpack ``deb`` into ``target`` with ``dpkg -x``."""
    if shutil.which("dpkg") is None:
        raise DataSourceError(
            f"dpkg not found, so {deb} cannot be unpacked; unpack it yourself "
            f"and point {package.env} at the extracted folder"
        )
    result = _run(["dpkg", "-x", str(deb), str(target)], deb.parent, package)
    if result.returncode != 0:
        raise DataSourceError(
            f"dpkg -x {deb} failed ({_last_line(result.stderr)}); is it a valid .deb?"
        )
    return target


def _run(command: list[str], cwd: Path, package: DebianPackage) -> subprocess.CompletedProcess:
    """Run ``command`` in ``cwd`` capturing output; a timeout or OS error is a DataSourceError."""
    try:
        return subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=_APT_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataSourceError(f"{' '.join(command)} could not run ({exc}); {package.hint}") from exc


def _last_line(stderr: str) -> str:
    """The last meaningful line of a tool's error output."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith("W:")]
    return (errors or lines or ["no error output"])[-1]
