"""Hugging Face Hub ids as model inputs, through huggingface_hub and its cache (as mlx_lm and mergekit do).

    resolve("ft/")                                  -> Path("ft/")   a local path that exists always wins
    resolve("org/name")                             -> the cached snapshot folder (downloaded if missing)
    resolve("org/name@v1.0")                        -> the snapshot of that branch, tag or commit
    resolve("org/name/model.Q8_0.gguf")             -> one file of a GGUF repo

The library reads the Hub cache only; a caller that allows downloads (the CLI: allow_downloads()) also
fetches what is missing, with huggingface_hub's own progress bar (on stderr). Offline (HF_HUB_OFFLINE=1) a
cached repo works and a missing one is one InputError saying how to get it. A string that is neither an existing path
nor a valid repo id comes back unchanged, so the reader's "no such file or directory" names it.

`origin(path)` tells, for any path inside a Hub cache snapshot, the repo id and the commit it came from: the
bundle manifest records them among the sources (converters/bundle.py build_manifest).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import InputError

# what a model repo needs: config, weights, tokenizer, chat template, PEFT / mlx_lm adapter files
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]

_SNAPSHOT = re.compile(r"^models--(?P<repo>.+)$")
_SHA = re.compile(r"^[0-9a-f]{40}$")


_downloads = False  # whether resolve() may download (set by the CLI; library calls read the cache only)


def allow_downloads(on: bool = True) -> None:
    """Let resolve() fetch repos missing from the cache (unless HF_HUB_OFFLINE is set)."""
    global _downloads
    _downloads = bool(on)


def parse(spec: str) -> tuple[str, str | None, str | None] | None:
    """(repo id, revision, file in the repo) of `org/name[@revision][/path/file]`, or None when `spec` is not
    a valid Hub id (a file path is one only when it ends in .gguf or .safetensors)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    spec = str(spec)
    if spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") < 1:
        return None
    parts = spec.split("/")
    org, rest = parts[0], parts[1:]
    name, revision = rest[0], None
    filename = "/".join(rest[1:]) or None
    if "@" in name:
        name, revision = name.split("@", 1)
        if not revision:
            return None
    if filename is not None and not filename.lower().endswith((".gguf", ".safetensors")):
        return None
    try:
        validate_repo_id(f"{org}/{name}")
    except HFValidationError:
        return None
    return f"{org}/{name}", revision, filename


def resolve(spec, *, local_files_only: bool | None = None, what: str = "model") -> Path:
    """A local path for `spec`: the path itself when it exists (or is no Hub id), else the Hub snapshot folder
    (or file) from the cache, downloaded when missing and allowed. local_files_only: never download (default:
    unless allow_downloads() was called and HF_HUB_OFFLINE is not set, read now)."""
    if isinstance(spec, os.PathLike) and not isinstance(spec, str):
        spec_str = os.fspath(spec)
    else:
        spec_str = str(spec)
    path = Path(spec_str).expanduser()
    if path.exists():
        return path
    parsed = parse(spec_str)
    if parsed is None:
        return path
    repo_id, revision, filename = parsed
    if local_files_only is None:
        local_files_only = _offline() or not _downloads
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import hf_hub_download, snapshot_download

    kw = {"revision": revision, "cache_dir": os.environ.get("HF_HUB_CACHE") or None,
          "local_files_only": local_files_only}
    try:
        if filename is not None:
            got = Path(hf_hub_download(repo_id, filename, **kw))
            if got.suffix == ".safetensors":  # an mlx_lm adapter file: its adapter_config.json beside it
                _optional(hf_hub_download, repo_id, str(Path(filename).with_name("adapter_config.json")), kw)
            return got
        got = Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, **kw))
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled):
        why = "HF_HUB_OFFLINE is set" if _offline() else "cannot reach the Hub" if not local_files_only \
            else "downloads are off" if not _downloads else "not downloaded here"
        how = f"huggingface-cli download {repo_id}" + (f" {filename}" if filename else "") + \
            (f" --revision {revision}" if revision else "")
        raise InputError(f"{spec_str}: no such file or directory, and Hub {what} {repo_id!r}"
                         f"{' at ' + revision if revision else ''}{' file ' + repr(filename) if filename else ''} "
                         f"is not in the Hub cache ({why}): "
                         f"run once online, or `{how}`") from None
    except hf_errors.RevisionNotFoundError:
        raise InputError(f"{spec_str}: Hub repo {repo_id!r} has no revision {revision!r}") from None
    except hf_errors.EntryNotFoundError:
        raise InputError(f"{spec_str}: Hub repo {repo_id!r} has no file {filename!r}") from None
    except hf_errors.RepositoryNotFoundError:  # also gated or private without a token
        raise InputError(f"{spec_str}: no such file or directory, nor a Hub {what} repo you can read "
                         "(check the name; private or gated repos need `huggingface-cli login`)") from None
    except (OSError, ValueError) as e:  # network errors (requests' are OSErrors), a malformed cache
        raise InputError(f"{spec_str}: cannot get Hub repo {repo_id!r} ({' '.join(str(e).split())})") from None
    if what != "run" and not any((got / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise InputError(f"{spec_str}: Hub repo {repo_id!r} has no config.json (not a transformers model); for a "
                         f"GGUF repo name its file: {repo_id}/FILE.gguf")
    return got


def _optional(download, repo_id: str, filename: str, kw: dict) -> None:
    from huggingface_hub import errors as hf_errors

    try:
        download(repo_id, filename, **kw)
    except (hf_errors.EntryNotFoundError, hf_errors.LocalEntryNotFoundError, OSError, ValueError):
        pass


def resolve_all(*specs, local_files_only: bool | None = None):
    """resolve() of each spec; None stays None."""
    return tuple(None if s is None else resolve(s, local_files_only=local_files_only) for s in specs)


def origin(path) -> dict:
    """{"repo_id", "revision"[, "file"]} when `path` lies inside a Hub cache snapshot
    (.../models--org--name/snapshots/<commit>/...), else {}."""
    parts = Path(os.path.abspath(path)).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and _SHA.match(parts[i + 1]):
            m = _SNAPSHOT.match(parts[i - 1])
            if m is None:
                return {}
            out = {"repo_id": m["repo"].replace("--", "/"), "revision": parts[i + 1]}
            inside = "/".join(parts[i + 2:])
            if inside:
                out["file"] = inside
            return out
    return {}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
