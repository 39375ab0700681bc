"""Short names for models that ship inside Python packages (usable offline)."""

from __future__ import annotations

from pathlib import Path


def alias_path(name: str) -> Path | None:
    """The file an alias stands for, or None when ``name`` is not an alias."""
    return None
