"""Content hashes: a file's sha256, and one over files and folders (names and contents) for cache keys."""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 1 << 20


def _update_with_file(h, path: Path) -> None:
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])


def sha256_file(path) -> str:
    """The sha256 of one file's bytes, read in 1 MB blocks."""
    h = hashlib.sha256()
    _update_with_file(h, Path(path))
    return h.hexdigest()


def sha256_tree(paths, prefix: bytes = b"") -> str:
    """One sha256 over files and folders: each file's name (relative to the folder given) and bytes, sorted."""
    h = hashlib.sha256(prefix)
    for root in [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            h.update(str(f.relative_to(root) if f != root else f.name).encode())
            _update_with_file(h, f)
    return h.hexdigest()
