"""The bundle: the folder `convert` writes and everything else reads (DESIGN.md section 3).

    BUNDLE/
      epicode.json                 manifest (format_version, mu, defaults, files, sources, ...)
      gguf/<role>-<QUANT>.gguf     role: expert | amateur | inferior
      mlx/<role>/                  mlx_lm folders
      hf/<role>/                   extrapolated HF checkpoint

Writing is atomic: everything goes into a hidden temporary folder next to the target
(`.BUNDLE.tmp-XXXX`), which is renamed when complete; any exception (Ctrl-C included) removes it.

    b = open_bundle("bundle/")
    b.mu, b.lam, b.alpha, b.gguf("expert", "Q8_0"), b.mlx("amateur"), b.quants, b.formats
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path

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
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BundleError(f"{out}: cannot be written ({ancestor} is not a folder)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise BundleError(f"{out}: cannot be written ({ancestor}: permission denied)")
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
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
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
            try:
                os.rename(self.tmp, self.out)
            except BaseException:
                os.rename(old, self.out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.out)
        self.committed = True
        return self.out

    def __exit__(self, exc_type, exc, tb):
        if not self.committed and self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(1 << 22)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


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


def _entries(manifest: dict):
    """Every (format, key, entry) file entry listed in the manifest."""
    files = manifest["files"]
    for q, per_role in files.get("gguf", {}).items():
        for role, e in per_role.items():
            yield f"gguf {q} {role}", e
    for fmt in ("mlx", "hf"):
        for role, e in files.get(fmt, {}).items():
            yield f"{fmt} {role}", e


def open_bundle(path, verify: bool = False) -> Bundle:
    """Read and validate a bundle: manifest present and well-formed, every listed file present with its
    size. verify=True also checks every sha256 (reads everything). Raises BundleError naming the file."""
    path = Path(path).expanduser().absolute()
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle folder")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{mpath}: missing (not an epicode bundle)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"{mpath}: unreadable manifest ({' '.join(str(e).split())})") from None
    _check_manifest(mpath, manifest)
    for what, e in _entries(manifest):
        _check_entry(path, mpath, what, e, verify)
    return Bundle(path, manifest)


def _check_manifest(mpath: Path, m) -> None:
    if not isinstance(m, dict):
        raise BundleError(f"{mpath}: invalid manifest (not an object)")
    version = m.get("format_version")
    if not isinstance(version, int):
        raise BundleError(f"{mpath}: invalid manifest (no format_version)")
    if version > FORMAT_VERSION:
        raise BundleError(f"{mpath}: format_version {version} is newer than this tool reads ({FORMAT_VERSION}); "
                          "upgrade epicode-edge")
    for key, kind in (("mu", (int, float)), ("defaults", dict), ("files", dict)):
        if not isinstance(m.get(key), kind):
            raise BundleError(f"{mpath}: invalid manifest (field {key!r} missing or malformed)")
    for key in ("lambda", "alpha"):
        if not isinstance(m["defaults"].get(key), (int, float)):
            raise BundleError(f"{mpath}: invalid manifest (field 'defaults.{key}' missing or malformed)")
    if not any(m["files"].get(f) for f in FORMATS):
        raise BundleError(f"{mpath}: invalid manifest (no files listed)")


def _check_entry(root: Path, mpath: Path, what: str, e, verify: bool) -> None:
    if not isinstance(e, dict) or not isinstance(e.get("path"), str):
        raise BundleError(f"{mpath}: invalid manifest entry for {what}")
    p = root / e["path"]
    listed = e.get("files") or {"": e}
    for rel, fe in listed.items():
        f = p / rel if rel else p
        if not f.is_file():
            raise BundleError(f"{f}: missing (listed in {MANIFEST} for {what})")
        if "bytes" in fe and f.stat().st_size != fe["bytes"]:
            raise BundleError(f"{f}: size {f.stat().st_size} != {fe['bytes']} listed in {MANIFEST} (incomplete copy?)")
        if verify and "sha256" in fe and sha256_file(f) != fe["sha256"]:
            raise BundleError(f"{f}: sha256 differs from {MANIFEST} (file changed or corrupted)")


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
        lines.append(f"{'' if i else 'sources':<10} {role:<9} {src.get('path')} "
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
