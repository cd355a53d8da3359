"""Where epicode-edge keeps per-user files: the cache folder (demo bundles, the CPU-kernel probe's result)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "EPICODE_EDGE_CACHE"


def cache_dir() -> Path:
    """$EPICODE_EDGE_CACHE, else $XDG_CACHE_HOME/epicode-edge, else ~/.cache/epicode-edge (not created here)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "epicode-edge"


def unwritable_reason(path) -> str | None:
    """Why a folder could not be made at `path` (its nearest existing parent is not a writable folder), or None."""
    ancestor = Path(path).parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor}: permission denied"
    return None
