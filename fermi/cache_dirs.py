"""Where fermi keeps what it builds on this machine (compiled kernels, compile caches)."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache(variable: str, name: str) -> Path:
    """``$variable`` when set, else ``$XDG_CACHE_HOME/fermi/<name>`` (``~/.cache/fermi/<name>``
    without ``XDG_CACHE_HOME``)."""
    explicit = os.environ.get(variable)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fermi" / name
