"""The bundle: the folder `convert` writes and everything else reads (docs/bundle.md).

    BUNDLE/
      epicode.json                 manifest (format_version, mu, defaults, files, sources, ...)
      gguf/<role>-<QUANT>.gguf     role: expert | amateur | inferior
      mlx/<role>/                  mlx_lm folders
      hf/<role>/                   extrapolated HF checkpoint

Writing is atomic: everything goes into a hidden temporary folder next to the target
(`.BUNDLE.tmp-XXXX`), which is renamed when complete; any exception (Ctrl-C included) removes it.
A forced replace moves the old bundle aside (`.BUNDLE.old-XXXX`) before the new one takes its name, then
deletes it. What a killed writer leaves of either is removed by the next writer of the same target: stale
temporary folders when it starts, stale old bundles once its new bundle is in place.

    b = open_bundle("bundle/")
    b.mu, b.lam, b.alpha, b.gguf("expert", "Q8_0"), b.mlx("amateur"), b.quants, b.formats
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import secrets
import shutil
from pathlib import Path

from ..defaults import MAX_LAMBDA
from ..hashing import sha256_file  # noqa: F401  (part of this module's API: bundle.sha256_file)
from ..userdirs import unwritable_reason
from ..errors import BundleError

FORMAT_VERSION = 1
MANIFEST = "epicode.json"
ROLES = ("expert", "amateur", "inferior")
FORMATS = ("gguf", "mlx", "hf")


def gguf_relpath(role: str, quant: str) -> str:
    return f"gguf/{role}-{quant}.gguf"


def mlx_relpath(role: str) -> str:
    return f"mlx/{role}"


def hf_relpath(role: str) -> str:
    return f"hf/{role}"


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------


def check_output(out, force: bool = False, marker: str = MANIFEST) -> Path:
    """Validate the target before anything is written: absent, or (with force) a folder holding `marker`
    (an old bundle; config.json for an HF folder) or an empty folder. Never replaces anything else."""
    out = Path(out).expanduser().absolute()
    if out.exists() or out.is_symlink():
        if not force:
            raise BundleError(f"{out}: already exists (use --force to replace it)")
        if not out.is_dir():
            raise BundleError(f"{out}: exists and is not a folder; refusing to replace it")
        if not (out / marker).is_file() and any(out.iterdir()):
            what = "an epicode bundle" if marker == MANIFEST else "a model folder"
            raise BundleError(f"{out}: exists and is not {what} (no {marker}); refusing to replace it")
    why = unwritable_reason(out)
    if why:
        raise BundleError(f"{out}: cannot be written ({why})")
    return out


class BundleWriter:
    """Context manager owning the temporary folder; `commit(manifest)` makes it the bundle.

        with BundleWriter(out, force) as bw:
            sink = HFSink(bw.path("hf/expert"), ...)
            ...
            bw.commit(manifest)
    """

    def __init__(self, out, force: bool = False, marker: str = MANIFEST):
        self.out = check_output(out, force, marker)
        self.force, self.marker = force, marker
        self.tmp: Path | None = None
        self.committed = False

    def __enter__(self) -> "BundleWriter":
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.out)
            self.tmp, self._lock = _make_temp(self.out)
        except OSError as e:
            raise BundleError(f"{self.out}: cannot be written ({e.strerror or e})") from None
        return self

    def path(self, rel: str) -> Path:
        """Absolute path of `rel` inside the temporary folder (its parent folders created)."""
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def commit(self, manifest: dict | None) -> Path:
        """Write epicode.json (unless None) and move the folder to its final name (replacing an old one if forced)."""
        if manifest is not None:
            (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if self.out.exists():
            check_output(self.out, self.force, self.marker)  # still an old bundle, not something that appeared meanwhile
            old = self.out.with_name(f".{self.out.name}.old-{secrets.token_hex(4)}")
            os.rename(self.out, old)
            old_lock = None
            try:
                old_lock = _lock_held(old / LOCK_FILE)  # ours while it lives: remove_stale_olds leaves it
                os.rename(self.tmp, self.out)
            except BaseException:
                os.rename(old, self.out)
                (self.out / LOCK_FILE).unlink(missing_ok=True)
                if old_lock is not None:
                    os.close(old_lock)
                raise
            try:
                shutil.rmtree(old, ignore_errors=True)
            finally:
                if old_lock is not None:
                    os.close(old_lock)
        else:
            os.rename(self.tmp, self.out)
        self.committed = True
        (self.out / LOCK_FILE).unlink(missing_ok=True)
        self._unlock()
        remove_stale_olds(self.out)  # what killed replaces of this target left, now that the new one is in place
        return self.out

    def _unlock(self) -> None:
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            os.close(lock)

    def __exit__(self, exc_type, exc, tb):
        if not self.committed and self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self._unlock()
        return False


def build_manifest(*, mu: float, lam: float, alpha: float, arch: str, tokenizer_hash: str, sources: dict,
                   files: dict, warnings: list, summary: dict, **extra) -> dict:
    """epicode.json of a new bundle: format and tool versions, creation time, the method's parameters, sources
    and files; `extra` adds layout-specific fields (a shared-base bundle's layout and LoRA scales)."""
    from datetime import datetime, timezone

    from ..version import __version__
    from .hub import origin

    # a source inside the Hugging Face cache also records its repo id and commit (converters/hub.py)
    sources = {role: {**src, **origin(src["path"])} if isinstance(src, dict) and isinstance(src.get("path"), str)
               else src for role, src in sources.items()}
    return {"format_version": FORMAT_VERSION, "tool": "epicode-edge", "tool_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra, "mu": mu,
            "defaults": {"lambda": lam, "alpha": alpha}, "arch": arch, "tokenizer_hash": tokenizer_hash,
            "sources": sources, "files": files, "warnings": warnings, "summary": summary}


def copy_bundle(src, out, *, force: bool = False, **changes) -> "Bundle":
    """A copy of bundle `src` at `out` with manifest fields changed (e.g. tune's decoding defaults), written as
    every bundle is: under a temporary name, renamed when complete."""
    b = open_bundle(src)
    with BundleWriter(out, force) as bw:
        for item in b.path.iterdir():
            if item.name in (MANIFEST, LOCK_FILE):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, bw.tmp / item.name)
        (bw.tmp / MANIFEST).write_text(json.dumps({**b.manifest, **changes}, indent=2) + "\n")
        open_bundle(bw.tmp)  # the changed manifest is checked before the copy gets its final name
        path = bw.commit(None)
    return open_bundle(path)


# The temporary folder holds this file, locked (flock) by the writing process for as long as it runs: a
# folder whose lock can be taken belongs to a process that died (kill -9, power loss) and is removed by the
# next writer of the same target. The lock goes with the process, so a reused pid cannot fool it.
LOCK_FILE = ".epicode-writer.lock"


def _make_temp(out: Path) -> tuple[Path, int | None]:
    """A new hidden folder next to `out`, with the permissions of the umask (mkdtemp would make it 0700, and
    the bundle keeps its folder's mode), holding the writer's lock."""
    for _ in range(100):
        tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        try:
            return tmp, _lock_new(tmp / LOCK_FILE)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    raise FileExistsError(f"no free temporary name next to {out}")


def _lock_new(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        import fcntl
    except ImportError:  # Windows: no stale-folder cleanup
        return fd
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _lock_held(path: Path) -> int | None:
    """Create (or reuse) the lock file `path` and hold it; None where there is no flock or it cannot be made."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_stale_olds(out) -> list[Path]:
    """Remove the old bundles of `out` (.NAME.old-XXXXXXXX, 8 hex digits) that a forced replace moved aside
    and did not get to delete (killed); returns them. A folder whose lock file is held belongs to a live
    writer in the middle of its replace and is kept; so are other names, links and files."""
    out = Path(out)
    pattern = re.compile(rf"\.{re.escape(out.name)}\.old-[0-9a-f]{{8}}")
    removed = []
    for d in out.parent.glob(f".{glob.escape(out.name)}.old-*"):
        if not pattern.fullmatch(d.name) or d.is_symlink() or not d.is_dir():
            continue
        fd = _lock_held(d / LOCK_FILE) if (d / LOCK_FILE).is_file() else None
        if (d / LOCK_FILE).is_file() and fd is None:  # held: a live writer (or unreadable: leave it)
            continue
        try:
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                removed.append(d)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def remove_stale_temps(out) -> list[Path]:
    """Remove the temporary folders of `out` (.NAME.tmp-XXXX) left by writers that died; returns them.
    A folder is removed only when its lock file exists and is not held: a live writer keeps it."""
    try:
        import fcntl
    except ImportError:
        return []
    out = Path(out)
    removed = []
    for d in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        lock = d / LOCK_FILE
        if d.is_symlink() or not d.is_dir() or not lock.is_file():
            continue
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a live writer
            os.close(fd)
            continue
        try:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        finally:
            os.close(fd)
    return removed



def file_entry(root: Path, rel: str, **extra) -> dict:
    """Manifest entry of a file (bytes, sha256) or folder (bytes, and each file's bytes and sha256)."""
    p = Path(root) / rel
    if p.is_file():
        return {"path": rel, "bytes": p.stat().st_size, "sha256": sha256_file(p), **extra}
    files = {str(f.relative_to(p)): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
             for f in sorted(p.rglob("*")) if f.is_file()}
    return {"path": rel, "bytes": sum(f["bytes"] for f in files.values()), **extra, "files": files}


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------


class Bundle:
    """A validated bundle folder. Paths are absolute; roles: expert, amateur, optional inferior."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.mu = float(manifest["mu"])
        self.lam = float(manifest["defaults"]["lambda"])
        self.alpha = float(manifest["defaults"]["alpha"])
        files = manifest["files"]
        self.formats = [f for f in FORMATS if files.get(f)]
        self.quants = list(files.get("gguf", {}))
        self.roles = [r for r in ROLES if any(r in _roles(files, f) for f in self.formats)]
        if not self.roles and "lora" in manifest:  # shared base: the roles are adapter scalings of one base
            self.roles = [r for r in ROLES if r in manifest["lora"].get("scales", {})]
        self.arch = manifest.get("arch")
        self.tokenizer_hash = manifest.get("tokenizer_hash")
        self.summary = manifest.get("summary", {})

    def gguf(self, role: str = "expert", quant: str | None = None) -> Path:
        """The GGUF file of a role; quant None = the first quant the bundle was made with."""
        quants = self.manifest["files"].get("gguf", {})
        if not quants:
            raise BundleError(f"{self.path}: the bundle has no GGUF files (formats: {', '.join(self.formats) or 'none'})")
        if quant is None:
            quant = self.quants[0]
        q = next((k for k in quants if k.upper() == str(quant).upper()), None)
        if q is None:
            raise BundleError(f"{self.path}: no GGUF files for quant {quant} (the bundle has {', '.join(self.quants)})")
        if role not in quants[q]:
            raise BundleError(f"{self.path}: no GGUF {role} for quant {q} (roles: {', '.join(quants[q])})")
        return self.path / quants[q][role]["path"]

    def mlx(self, role: str = "expert") -> Path:
        return self._folder("mlx", role)

    def hf(self, role: str = "expert") -> Path:
        return self._folder("hf", role)

    def _folder(self, fmt: str, role: str) -> Path:
        entries = self.manifest["files"].get(fmt, {})
        if role not in entries:
            has = f"{fmt} roles: {', '.join(entries)}" if entries else f"formats: {', '.join(self.formats)}"
            raise BundleError(f"{self.path}: the bundle has no {fmt.upper()} {role} ({has})")
        return self.path / entries[role]["path"]

    def __repr__(self) -> str:
        return f"<Bundle {self.path} mu={self.mu} formats={self.formats} quants={self.quants}>"


def _roles(files: dict, fmt: str) -> set[str]:
    if fmt == "gguf":
        return {r for per_quant in files["gguf"].values() for r in per_quant}
    return set(files[fmt])


MANIFEST_MAX_BYTES = 16 << 20  # a manifest is a few KB; anything near this is not one of ours
_TOP_LEVEL = {  # field -> (accepted types, required); other top-level fields are allowed and ignored
    "format_version": (int, True), "mu": ((int, float), True), "defaults": (dict, True), "files": (dict, True),
    "tool": (str, False), "tool_version": (str, False), "created": (str, False), "arch": ((str, type(None)), False),
    "tokenizer_hash": ((str, type(None)), False), "sources": (dict, False), "warnings": (list, False),
    "summary": (dict, False), "layout": (str, False), "lora": (dict, False),
}
LAYOUTS = ("shared-base",)
_HEX = set("0123456789abcdef")


def open_bundle(path, verify: bool = False) -> Bundle:
    """Read and validate a bundle: manifest present and well-formed (the whole schema, once), every listed
    file inside the bundle folder (no absolute paths, no `..`, no symlink leading out) and present with its
    size. verify=True also checks every sha256 (reads everything). Raises BundleError naming the file or
    the manifest field."""
    path = Path(path).expanduser().absolute()
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle folder")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{mpath}: missing (not an epicode bundle)")
    manifest = _read_manifest(mpath)
    check_manifest(manifest, mpath)
    for what, e in _entries(manifest):
        _check_entry(path, mpath, what, e, verify)
    return Bundle(path, manifest)


def _read_manifest(mpath: Path):
    try:
        if mpath.stat().st_size > MANIFEST_MAX_BYTES:
            raise BundleError(f"{mpath}: unreadable manifest (larger than {MANIFEST_MAX_BYTES >> 20} MB)")
        return json.loads(mpath.read_text(encoding="utf-8"))
    except RecursionError:
        raise BundleError(f"{mpath}: unreadable manifest (JSON nested too deeply)") from None
    except (OSError, ValueError) as e:
        raise BundleError(f"{mpath}: unreadable manifest ({' '.join(str(e).split())})") from None


def _bad(mpath, field: str, what: str) -> BundleError:
    return BundleError(f"{mpath}: invalid manifest (field {field!r} {what})")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_manifest(m, mpath="epicode.json") -> None:
    """The whole manifest schema (types and ranges of every field this tool reads); BundleError naming the
    first field at fault. File entries are checked for shape here and against the folder by open_bundle."""
    if not isinstance(m, dict):
        raise BundleError(f"{mpath}: invalid manifest (not an object)")
    version = m.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _bad(mpath, "format_version", "missing or not an integer >= 1")
    if version > FORMAT_VERSION:
        raise BundleError(f"{mpath}: format_version {version} is newer than this tool reads ({FORMAT_VERSION}); "
                          "upgrade epicode-edge")
    for key, (kind, required) in _TOP_LEVEL.items():
        if key not in m:
            if required:
                raise _bad(mpath, key, "missing or malformed")
            continue
        v = m[key]
        if isinstance(v, bool) or not isinstance(v, kind):
            raise _bad(mpath, key, "missing or malformed" if required else f"has the wrong type ({type(v).__name__})")
    if not _is_number(m["mu"]) or m["mu"] < 0:
        raise _bad(mpath, "mu", f"missing or malformed: must be a finite number >= 0, got {m['mu']!r}")
    d = m["defaults"]
    lam, alpha = d.get("lambda"), d.get("alpha")
    if not _is_number(lam) or not 0 <= lam <= MAX_LAMBDA:
        raise _bad(mpath, "defaults.lambda", f"missing or malformed: must be a finite number >= 0 and at most "
                                             f"{MAX_LAMBDA:g}, got {lam!r}")
    if not _is_number(alpha) or not 0 < alpha <= 1:
        raise _bad(mpath, "defaults.alpha", f"missing or malformed: must be in (0, 1], got {alpha!r}")
    for i, w in enumerate(m.get("warnings", [])):
        if not isinstance(w, str):
            raise _bad(mpath, f"warnings[{i}]", "is not a string")
    for role, src in m.get("sources", {}).items():
        if not isinstance(src, dict):
            raise _bad(mpath, f"sources.{role}", "is not an object")
        for k in ("path", "format", "content_sha256"):
            if k in src and not isinstance(src[k], str):
                raise _bad(mpath, f"sources.{role}.{k}", "is not a string")
    for k, v in m.get("summary", {}).items():
        if not _is_number(v):
            raise _bad(mpath, f"summary.{k}", "is not a finite number")
    _check_files(m, mpath)
    layout = m.get("layout")
    if layout is not None and layout not in LAYOUTS:
        raise _bad(mpath, "layout", f"is {layout!r}; this tool reads {', '.join(LAYOUTS)}")
    if layout == "shared-base":
        _check_lora(m, mpath)


def _check_files(m: dict, mpath) -> None:
    files = m["files"]
    for group, per in files.items():
        if group not in FORMATS + ("lora",):
            raise _bad(mpath, f"files.{group}", f"is not a file group of this tool ({', '.join(FORMATS + ('lora',))})")
        if not isinstance(per, dict):
            raise _bad(mpath, f"files.{group}", "is not an object")
    for q, per_role in files.get("gguf", {}).items():
        if not isinstance(per_role, dict) or not per_role:
            raise _bad(mpath, f"files.gguf.{q}", "is not a non-empty object of roles")
        for role in per_role:
            if role not in ROLES + ("base",):
                raise _bad(mpath, f"files.gguf.{q}.{role}", f"is not a role ({', '.join(ROLES + ('base',))})")
    for fmt in ("mlx", "hf"):
        for role in files.get(fmt, {}):
            if role not in ROLES:
                raise _bad(mpath, f"files.{fmt}.{role}", f"is not a role ({', '.join(ROLES)})")
    if not any(files.get(f) for f in FORMATS):
        raise BundleError(f"{mpath}: invalid manifest (no files listed)")
    for what, field, e in _entries_with_fields(m):
        _check_entry_schema(mpath, field, e)


def _check_entry_schema(mpath, field: str, e) -> None:
    if not isinstance(e, dict):
        raise _bad(mpath, field, "is not an object")
    if not isinstance(e.get("path"), str) or not e["path"]:
        raise _bad(mpath, f"{field}.path", "missing or not a string")
    listed = e.get("files")
    if listed is None:
        _check_sizes(mpath, field, e)
        return
    if not isinstance(listed, dict) or not listed:
        raise _bad(mpath, f"{field}.files", "is not a non-empty object")
    for rel, fe in listed.items():
        if not isinstance(fe, dict):
            raise _bad(mpath, f"{field}.files.{rel}", "is not an object")
        _check_sizes(mpath, f"{field}.files.{rel}", fe)
    if "bytes" in e and (isinstance(e["bytes"], bool) or not isinstance(e["bytes"], int) or e["bytes"] < 0):
        raise _bad(mpath, f"{field}.bytes", "is not an integer >= 0")
    for k in ("bits", "group_size"):
        v = e.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise _bad(mpath, f"{field}.{k}", "is not a positive integer")


def _check_sizes(mpath, field: str, fe: dict) -> None:
    n = fe.get("bytes")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise _bad(mpath, f"{field}.bytes", "missing or not an integer >= 0")
    h = fe.get("sha256")
    if not isinstance(h, str) or len(h) != 64 or not set(h) <= _HEX:
        raise _bad(mpath, f"{field}.sha256", "missing or not 64 lowercase hex digits")


def _check_lora(m: dict, mpath) -> None:
    lora_files = m["files"].get("lora")
    if not isinstance(lora_files, dict) or not lora_files:
        raise _bad(mpath, "files.lora", "missing (a shared-base bundle lists its adapter files)")
    if not isinstance(m.get("lora"), dict) or not isinstance(m["lora"].get("scales"), dict):
        raise _bad(mpath, "lora.scales", "missing or not an object")
    if not any("base" in per for per in m["files"].get("gguf", {}).values()):
        raise _bad(mpath, "files.gguf", "has no base model (a shared-base bundle needs one)")
    for role, per in m["lora"]["scales"].items():
        if role not in ROLES or not isinstance(per, dict):
            raise _bad(mpath, f"lora.scales.{role}", f"is not a role ({', '.join(ROLES)}) with an object of scales")
        for which, scale in per.items():
            if which not in lora_files:
                raise _bad(mpath, f"lora.scales.{role}.{which}", "names an adapter that files.lora does not list")
            if not _is_number(scale) or abs(scale) > 1e6:
                raise _bad(mpath, f"lora.scales.{role}.{which}", f"must be a finite number (|s| <= 1e6), got {scale!r}")


def resolve_inside(root: Path, rel: str, what: str) -> Path:
    """root / rel, refused unless it stays inside root: relative, no `..`, no symlink leading out."""
    rel_path = Path(rel)
    if rel_path.is_absolute() or rel.startswith(("/", "\\")) or ".." in rel_path.parts or "\\" in rel \
            or "\x00" in rel:
        raise BundleError(f"{root / MANIFEST}: {what}: path {rel!r} is not a relative path inside the bundle folder (refused)")
    p = root / rel_path
    try:
        real, real_root = p.resolve(), root.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise BundleError(f"{p}: cannot be resolved (symlink loop?) (listed in {MANIFEST} for {what})") from None
    if real != real_root and real_root not in real.parents:
        raise BundleError(f"{p}: leads outside the bundle folder (symlink to {real}); refused "
                          f"(listed in {MANIFEST} for {what})")
    return p


def _entries_with_fields(manifest: dict):
    """Every (description, manifest field, entry) file entry listed in the manifest (adapters included)."""
    files = manifest["files"]
    for q, per_role in files.get("gguf", {}).items():
        for role, e in per_role.items():
            yield f"gguf {q} {role}", f"files.gguf.{q}.{role}", e
    for fmt in ("mlx", "hf", "lora"):
        for role, e in files.get(fmt, {}).items():
            yield f"{fmt} {role}", f"files.{fmt}.{role}", e


def _entries(manifest: dict):
    """Every (description, entry) file entry listed in the manifest."""
    for what, _, e in _entries_with_fields(manifest):
        yield what, e


def _check_entry(root: Path, mpath: Path, what: str, e, verify: bool) -> None:
    p = resolve_inside(root, e["path"], what)
    listed = e.get("files")
    if listed is not None:
        if not p.is_dir():
            raise BundleError(f"{p}: missing folder (listed in {MANIFEST} for {what})")
        _no_links_out(root, p, what)
    for rel, fe in (listed or {"": e}).items():
        f = resolve_inside(root, f"{e['path']}/{rel}", what) if rel else p
        if not f.is_file():
            raise BundleError(f"{f}: missing (listed in {MANIFEST} for {what})")
        size = f.stat().st_size
        if size != fe["bytes"]:
            raise BundleError(f"{f}: size {size} != {fe['bytes']} listed in {MANIFEST} (incomplete copy?)")
        if verify and sha256_file(f) != fe["sha256"]:
            raise BundleError(f"{f}: sha256 differs from {MANIFEST} (file changed or corrupted)")


def _no_links_out(root: Path, folder: Path, what: str) -> None:
    """A model folder (read by an engine that globs it) holds no symlink leading outside the bundle."""
    for f in folder.rglob("*"):
        if f.is_symlink():
            resolve_inside(root, str(f.relative_to(root)), what)


# ----------------------------------------------------------------------------------------------
# describing (for `epicode-edge info`)
# ----------------------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def describe(b: Bundle) -> list[str]:
    """What a bundle holds, as lines of text."""
    m = b.manifest
    lines = [f"bundle     {b.path}",
             f"made by    epicode-edge {m.get('tool_version', '?')} on {m.get('created', '?')} (format {m['format_version']})",
             f"method     mu = {b.mu}   defaults: lambda = {b.lam}, alpha = {b.alpha}",
             f"model      {b.arch or '?'}; tokenizer sha256 {str(b.tokenizer_hash or '?')[:16]}"]
    for i, (role, src) in enumerate(m.get("sources", {}).items()):
        where = f"{src['repo_id']}@{str(src.get('revision', '?'))[:12]}" if isinstance(src.get("repo_id"), str) \
            else src.get("path")
        lines.append(f"{'' if i else 'sources':<10} {role:<9} {where} "
                     f"({src.get('format', '?')}, content sha256 {str(src.get('content_sha256', '?'))[:16]})")
    files = m["files"]
    for q, per_role in files.get("gguf", {}).items():
        parts = ", ".join(f"{r} {human_bytes(e['bytes'])}" for r, e in per_role.items())
        lines.append(f"gguf       {q:<7} {parts}")
    for fmt in ("mlx", "hf"):
        for role, e in files.get(fmt, {}).items():
            how = ""
            if fmt == "mlx":
                how = f" ({e['bits']}-bit, group {e['group_size']})" if e.get("bits") else " (not quantized)"
            lines.append(f"{fmt:<10} {role:<9} {e['path']}{how} {human_bytes(e['bytes'])}")
    for group, entries in files.items():  # other layouts' files (e.g. LoRA adapters)
        if group not in FORMATS and isinstance(entries, dict):
            for key, e in entries.items():
                if isinstance(e, dict) and "path" in e:
                    lines.append(f"{group:<10} {key:<9} {e['path']} {human_bytes(e.get('bytes', 0))}")
    for note in m.get("warnings", []):
        lines.append(f"warning    {note}")
    s = b.summary
    if s:
        lines.append(f"converted  in {s.get('seconds', 0):.1f} s, read {human_bytes(s.get('input_bytes', 0))}, "
                     f"wrote {human_bytes(s.get('output_bytes', 0))}, peak memory {human_bytes(s.get('peak_rss_bytes', 0))}")
    return lines
