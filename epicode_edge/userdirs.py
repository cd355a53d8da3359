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
