"""Where channelwise keeps downloaded and derived files."""

import os
from pathlib import Path


def channelwise_home() -> Path:
    """Return the cache root (``$CHANNELWISE_HOME`` or ``~/.cache/channelwise``), creating it."""
    configured = os.environ.get("CHANNELWISE_HOME")
    home = Path(configured).expanduser() if configured else Path.home() / ".cache" / "channelwise"
    home.mkdir(parents=True, exist_ok=True)
    return home
