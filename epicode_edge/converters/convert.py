"""`convert` and `extrapolate`: the offline half of EpiCoDe, as library calls.

    bundle = convert("ft/", "ep1/", "bundle/", mu=0.3, to=("gguf", "mlx"), quant=("Q8_0", "Q4_K_M"))
    expert_dir = extrapolate("ft/", "ep1/", "expert/", mu=0.3)   # HF folders or GGUF files in, HF folder out

Everything is validated (parameters, output path, inputs, architecture, quant names) before any output
is written. Then ONE pass over the input tensors feeds every sink: the expert HF folder (also the MLX
source), and one GGUF sink per role and quant (K-quants are finished by llama.cpp when the sink closes).
MLX folders are made afterwards from HF folders (expert: the one just written; amateur / inferior: the
input folders, or for GGUF inputs HF folders the pass rebuilds: converters/gguf_to_hf.py). The bundle
appears under its final name only when complete.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import math
import os
import queue
import re
import resource
import shutil
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..defaults import DEFAULT_ALPHA, DEFAULT_LAMBDA, MAX_LAMBDA
from ..errors import BundleError, ParameterError, UnsupportedError, require
from .bundle import (LOCK_FILE, Bundle, BundleWriter, build_manifest, file_entry, gguf_relpath, hf_relpath,
                     human_bytes, mlx_relpath, open_bundle)
from .checkpoint import Checkpoint, GGUFCheckpoint, HFCheckpoint, open_checkpoint
from .extrapolate import ExtrapolationWarning, check_mu, iter_expert, iter_expert_rows, validate_pair
from .hf import MAX_SHARD_BYTES, HFSink
from .safetensors_io import FLOAT_TAGS, to_f32

FORMATS = ("gguf", "mlx", "hf")


@dataclass(frozen=True)
class Progress:
    """What a progress callback receives, after each tensor and at each later stage."""

    stage: str  # "requantize" (llama.cpp, an input model unchanged, before the pass), "extrapolate" (the pass),
    #            "finish" (closing sinks: K-quants), "check" (check_model), "mlx", "hash"
    tensors_done: int
    tensors_total: int
    bytes_done: int  # input bytes read so far (finetuned + inferior)
    bytes_total: int
    name: str = ""  # the tensor just done, or what the stage works on


ProgressFn = Callable[[Progress], None]


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _as_list(value) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(v).strip() for v in items if str(v).strip()]


def check_formats(to) -> list[str]:
    formats = [f.lower() for f in _as_list(to)]
    for f in formats:
        if f not in FORMATS:
            raise UnsupportedError(f"unknown output format {f!r}; supported: {', '.join(FORMATS)}")
    if not formats:
        raise ParameterError(f"no output format given; choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def check_quants(quant) -> list[str]:
    from .gguf import check_quant

    quants = [check_quant(q) for q in _as_list(quant)]
    if not quants:
        raise ParameterError("no GGUF quant type given (e.g. Q8_0)")
    return list(dict.fromkeys(quants))


def check_decoding_defaults(lam, alpha) -> tuple[float, float]:
    if not (isinstance(lam, (int, float)) and not isinstance(lam, bool) and math.isfinite(lam)
            and 0 <= lam <= MAX_LAMBDA):
        raise ParameterError(f"lambda must be a finite number >= 0 and at most {MAX_LAMBDA:g} (got {lam})")
    if not (isinstance(alpha, (int, float)) and 0 < alpha <= 1):
        raise ParameterError(f"alpha must be in (0, 1] (got {alpha})")
    return float(lam), float(alpha)


def check_mlx(bits, group_size) -> None:
    from .mlx import MLX_BITS, MLX_GROUP_SIZES

    if bits is not None and bits not in MLX_BITS:
        raise ParameterError(f"mlx_bits must be one of {', '.join(map(str, MLX_BITS))} or None (got {bits})")
    if group_size not in MLX_GROUP_SIZES:
        raise ParameterError(f"mlx_group_size must be one of {', '.join(map(str, MLX_GROUP_SIZES))} (got {group_size})")


def check_support(ckpt: Checkpoint, formats: list[str]) -> None:
    """The architecture and input format can be exported to every requested format."""
    if ckpt.format == "gguf":
        if ckpt.config.get("general.type") == "adapter":
            raise UnsupportedError(f"{ckpt.path}: a GGUF LoRA adapter, not a model (give full checkpoints, or "
                                   "PEFT adapter folders with --base)")
        from .gguf_input import check_gguf_input

        # any architecture: GGUF -> GGUF is the same per-tensor sum for all; whether llama.cpp loads it is
        # for llama.cpp to say (convert's check_model, before writing and on what it wrote)
        check_gguf_input(ckpt)  # hyperparameters llama.cpp takes without aborting, chat templates
        if {"hf", "mlx"} & set(formats):
            from .gguf_to_hf import hf_plan

            hf_plan(ckpt)  # config, tensor names and tokenizer can be rebuilt (else one line naming the field)
        if "mlx" in formats:
            require("mlx_lm", "--to mlx")
        if "mlx" in formats and importlib.util.find_spec(f"mlx_lm.models.{_mlx_arch(ckpt.arch)}") is None:
            raise UnsupportedError(f"{ckpt.path}: architecture {ckpt.arch!r} is not supported by mlx_lm")
        return
    if "gguf" in formats:
        from .gguf import check_gguf_export

        check_gguf_export(ckpt.config, where=str(ckpt.path / "config.json"))
    from .shapes import check_config_shapes

    check_config_shapes(ckpt, for_gguf="gguf" in formats)  # before anything is written
    _check_chat_template(ckpt)
    if "mlx" in formats:
        require("mlx_lm", "--to mlx")
    if "mlx" in formats and importlib.util.find_spec(f"mlx_lm.models.{_mlx_arch(ckpt.arch)}") is None:
        raise UnsupportedError(f"{ckpt.path}/config.json: architecture {ckpt.arch!r} is not supported by mlx_lm")
    if "mlx" in formats:
        from .mlx import mlx_lm_config

        mlx_lm_config(ckpt.config, where=str(ckpt.path / "config.json"))  # what mlx_lm cannot run, refused now
    tok = Path(ckpt.tokenizer_dir or ckpt.path)
    if {"gguf", "mlx"} & set(formats) and not any((tok / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise UnsupportedError(f"{tok}: no tokenizer.json or tokenizer.model (needed for GGUF/MLX export)")


def _check_chat_template(ckpt: Checkpoint) -> None:
    """A chat template that does not parse would make every bundle load fail: refuse it now."""
    from .tokenizer_meta import check_chat_template, chat_template_of

    tok = Path(ckpt.tokenizer_dir or ckpt.path)
    found = chat_template_of(tok)
    if found is not None:
        check_chat_template(*found)


def _mlx_arch(arch: str) -> str:
    """The mlx_lm model module that loads `arch` (mlx_lm remaps some, e.g. mistral -> llama)."""
    try:
        from mlx_lm.utils import MODEL_REMAPPING
    except ImportError:
        return arch
    return MODEL_REMAPPING.get(arch, arch)


# ----------------------------------------------------------------------------------------------
# the one pass
# ----------------------------------------------------------------------------------------------


class _Sinks:
    """The writers fed by the pass, per role; closed (or aborted) together."""

    def __init__(self):
        self.hf: dict[str, HFSink] = {}  # role -> HF folder writer (storage arrays)
        self.gguf: dict[str, list] = {"expert": [], "amateur": [], "inferior": []}  # role -> GGUF sinks (f32)
        self.requantized: list = []  # GGUF inputs requantized by llama.cpp when closed (take no tensors)

    def all(self) -> list:
        return list(self.hf.values()) + [s for group in self.gguf.values() for s in group] + self.requantized

    def write(self, t) -> None:
        for role, array in (("expert", t.expert), ("amateur", t.finetuned), ("inferior", t.inferior)):
            if role in self.hf:
                self.hf[role].write(t.name, array)
            if self.gguf[role]:
                x = to_f32(array, t.tag)  # (shape) f32, one role at a time
                for sink in self.gguf[role]:
                    sink.write(t.name, x)
                del x

    def take_rows(self) -> bool:
        """Whether every sink takes tensors in pieces of rows (GGUF inputs); else whole tensors."""
        return (all(hasattr(sink, "write_rows") for sink in self.hf.values())
                and all(hasattr(sink, "copy_rows") for group in self.gguf.values() for sink in group))

    def encode_rows(self, p) -> list:
        """The GGUF sinks' encodings of a piece (thread-safe: nothing written); put_rows writes them. A model's
        rows already stored in a sink's type are copied as stored, as llama-quantize copies such tensors: the
        amateur (and inferior) whenever the quant is the input's type, the expert too at mu = 0."""
        out = []
        stored = p.stored or (None, None)
        for role, array, rows in (("expert", p.expert, stored[0] if p.expert is p.finetuned else None),
                                  ("amateur", p.finetuned, stored[0]), ("inferior", p.inferior, stored[1])):
            if self.gguf[role]:
                x = to_f32(array, p.tag)  # (n, C) f32
                for sink in self.gguf[role]:
                    if rows is not None and sink.stores_as(p.name, p.stored_type):
                        out.append(sink.copy_rows(p.name, rows, x))
                    else:
                        out.append(sink.encode_rows(p.name, x))
        return out

    def put_rows(self, p, encoded: list) -> None:
        """write_rows with the GGUF encodings made by encode_rows (in any thread), written here in order."""
        it = iter(encoded)
        for role, array in (("expert", p.expert), ("amateur", p.finetuned), ("inferior", p.inferior)):
            if role in self.hf:
                self.hf[role].write_rows(p.name, p.start, array)
            for sink in self.gguf[role]:
                sink.put_rows(p.name, p.start, next(it))

    def abort(self) -> None:
        for sink in self.all():
            try:
                sink.abort()
            except Exception:  # noqa: BLE001 - best effort while another error propagates
                pass


def _roles(with_inferior: bool) -> list[str]:
    return ["expert", "amateur"] + (["inferior"] if with_inferior else [])


def _hf_sink(out_dir: Path, source: Checkpoint, max_shard_bytes: int):
    """The HF folder writer for a source: GGUF inputs get their names, config and tokenizer rebuilt."""
    if source.format == "gguf":
        from .gguf_to_hf import GGUFToHFSink

        return GGUFToHFSink(out_dir, source, max_shard_bytes)
    return HFSink(out_dir, source.config, source.tensors, source.tokenizer_dir, max_shard_bytes)


def _open_sinks(bw: BundleWriter, ft: Checkpoint, inf: Checkpoint, formats, quants, with_inferior,
                max_shard_bytes, sinks: _Sinks, mu: float, progress: ProgressFn | None = None) -> dict[str, Path]:
    """Create the sinks inside the temporary bundle; returns role -> HF folder for the MLX export.

    The expert's HF folder is written by the pass (hf/expert, or a work folder without hf); amateur and
    inferior use their input folders, unless the input is not a plain HF folder (a GGUF, LoRA adapters, the text
    model of a multimodal checkpoint: then the pass writes one).
    """
    hf_dirs: dict[str, Path] = {}
    wanted = ["expert"] if "hf" in formats else []
    if "mlx" in formats:
        wanted = _roles(with_inferior)
    for role in wanted:
        source = inf if role == "inferior" else ft
        if role != "expert" and type(source) is HFCheckpoint and source.multimodal is None:
            hf_dirs[role] = source.path
            continue
        hf_dirs[role] = bw.path(hf_relpath(role) if role == "expert" and "hf" in formats else f".work/hf-{role}")
        sinks.hf[role] = _hf_sink(hf_dirs[role], source, max_shard_bytes)
    if "gguf" in formats:
        from .gguf import QUANTS, GGUFRequantizeSink, gguf_sink_for

        roles = [("expert", ft), ("amateur", ft)] + ([("inferior", inf)] if with_inferior else [])
        types: dict[str, dict] = {}  # quant -> llama.cpp's per-tensor types, read off the requantized amateur
        for role, source in reversed(roles):  # the amateur before the expert
            for q in quants:
                out = bw.path(gguf_relpath(role, q))
                unchanged = role != "expert" or mu == 0  # the input model itself
                if not (source.format == "gguf" and QUANTS[q][1] is None and isinstance(source.path, Path)):
                    sinks.gguf[role].append(gguf_sink_for(source, out, q))
                elif unchanged:
                    sink = GGUFRequantizeSink(out, source=source.path, quant=q)
                    sinks.requantized.append(sink)
                    if role == "amateur":  # made now: the expert is encoded to the types llama.cpp chose here
                        if progress:
                            progress(Progress("requantize", 0, 0, 0, 0, out.name))
                        sink.close()
                        types[q] = sink.types()
                else:
                    sinks.gguf[role].append(gguf_sink_for(source, out, q, types=types[q]))
    return hf_dirs


PIECE_ELEMENTS = 1 << 16  # values per piece of rows when the sinks take pieces: 256 KB per float32 array
AHEAD = 2  # pieces made ahead by a worker thread (0: no threads)
MAX_ENCODERS = 4  # threads encoding pieces for the GGUF sinks (one per core beside the reading one)


def _run_pass(ft: Checkpoint, inf: Checkpoint, mu: float, sinks: _Sinks, progress: ProgressFn | None):
    """Feed every sink, whole tensors or (GGUF -> GGUF) pieces of rows; progress after each tensor."""
    hashers = (ft.content_hasher(), inf.content_hasher())
    total = ft.nbytes + inf.nbytes
    n, i, done = len(ft.tensors), 0, 0
    if sinks.take_rows():  # pieces of rows: on several cores made by one thread, encoded on the other cores
        pieces = iter_expert_rows(ft, inf, mu, hashers=hashers, chunk_elements=PIECE_ELEMENTS)
        cores = _cores()
        if AHEAD and cores > 1:
            pieces = read_ahead(pieces, AHEAD)
        encoders = min(cores - 1, MAX_ENCODERS) if AHEAD else 1  # 1: encoded in this thread
        for p, encoded in encode_ahead(pieces, sinks.encode_rows, encoders):
            sinks.put_rows(p, encoded)
            name, last = p.name, p.start + len(p.expert) >= p.rows
            del p, encoded
            if last:
                i, done = _tensor_done(ft, inf, name, i, n, done, total, progress)
    else:
        for t in iter_expert(ft, inf, mu, hashers=hashers):
            sinks.write(t)
            name = t.name
            del t  # release this tensor's arrays and maps before the next one
            i, done = _tensor_done(ft, inf, name, i, n, done, total, progress)
    return hashers[0].hexdigest(), hashers[1].hexdigest()


def encode_ahead(items: Iterator, encode: Callable, workers: int) -> Iterator[tuple]:
    """(item, encode(item)) in the order of `items`, with up to `workers` items encoded at once on a thread
    pool (llama.cpp's encoders release the GIL); one worker: in this thread. An encoder's exception is raised
    here, in order; when the caller stops early, items not started are dropped and running ones finish."""
    if workers <= 1:
        for item in items:
            yield item, encode(item)
        return
    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="epicode-encode") as pool:
        try:
            for item in items:
                pending.append((item, pool.submit(encode, item)))
                if len(pending) > workers:
                    item, future = pending.popleft()
                    yield item, future.result()
            while pending:
                item, future = pending.popleft()
                yield item, future.result()
        finally:
            for _, future in pending:
                future.cancel()


def read_ahead(items: Iterator, depth: int) -> Iterator:
    """The items of `items`, made by a worker thread up to `depth` ahead of the caller. llama.cpp's (de)quantizers,
    numpy and hashlib release the GIL, so making piece i+1 overlaps encoding piece i on a second core. The
    worker's exception is raised here; when the caller stops early, the worker stops after its current item."""
    box: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                box.put(entry, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            put((end, e))

    worker = threading.Thread(target=work, name="epicode-read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            item, error = box.get()
            if item is end:
                if error is not None:
                    raise error
                return
            yield item
            del item
    finally:
        stop.set()
        worker.join()
        if hasattr(items, "close"):
            items.close()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _tensor_done(ft, inf, name, i, n, done, total, progress) -> tuple[int, int]:
    done += ft.tensors[name].nbytes + inf.tensors[name].nbytes
    if progress:
        progress(Progress("extrapolate", i + 1, n, done, total, name))
    return i + 1, done


def _open(source):
    """A path or Hub id (converters/hub.py) is opened (and closed after); a Checkpoint object (e.g. a merged
    LoRA) is used as is."""
    if isinstance(source, Checkpoint):
        return contextlib.nullcontext(source)
    from .hub import resolve

    return open_checkpoint(resolve(source))


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def convert(finetuned, inferior, out, *, mu, to: Iterable[str] | str = ("gguf",), quant: Iterable[str] | str = ("Q8_0",),
            mlx_bits: int | None = None, mlx_group_size: int = 64, with_inferior: bool = False, force: bool = False,
            lam: float = DEFAULT_LAMBDA, alpha: float = DEFAULT_ALPHA, progress: ProgressFn | None = None,
            max_shard_bytes: int = MAX_SHARD_BYTES, check_model: Callable[..., None] | None = None) -> Bundle:
    """Extrapolate finetuned/inferior with mu and write a bundle at `out` (docs/bundle.md).

    to: formats among gguf, mlx, hf (list or comma string); quant: GGUF quant types (one file per role and
    quant); mlx_bits (None = not quantized, or 2..8) and mlx_group_size for the MLX folders; with_inferior adds the inferior model
    (for a contrastive-only comparison); lam and alpha are stored as the bundle's decoding defaults.
    progress(Progress) is called after each tensor and at each later stage. Warnings (large mu, identical
    checkpoints) are issued as ExtrapolationWarning. check_model(paths), if given, is called once with the
    GGUF files written, before the bundle is committed (runtime.check_gguf_runs: each loads and gives finite
    logits; converters never import an engine), and check_model([path], vocab_only=True) on a GGUF finetuned
    input before anything is written (llama.cpp knows its architecture and reads its vocabulary). Returns
    the opened Bundle; its .summary holds sizes, time and peak memory.
    """
    t0 = time.perf_counter()
    formats = check_formats(to)
    quants = check_quants(quant) if "gguf" in formats else []
    mu = check_mu(mu)
    lam, alpha = check_decoding_defaults(lam, alpha)
    if "mlx" in formats:
        check_mlx(mlx_bits, mlx_group_size)
    bw = BundleWriter(out, force)  # checks the target; writes nothing yet
    with _open(finetuned) as ft, _open(inferior) as inf:
        notes = validate_pair(ft, inf, mu)
        check_support(ft, formats)
        if check_model is not None and "gguf" in formats and isinstance(ft, GGUFCheckpoint):
            check_model([ft.path], vocab_only=True)  # llama.cpp knows its architecture and reads its vocabulary
        for note in notes:
            warnings.warn(note, ExtrapolationWarning, stacklevel=2)
        with bw:
            try:
                sinks = _Sinks()
                try:
                    hf_dirs = _open_sinks(bw, ft, inf, formats, quants, with_inferior, max_shard_bytes, sinks, mu,
                                          progress)
                    digests = _run_pass(ft, inf, mu, sinks, progress)
                    for i, sink in enumerate(sinks.all()):
                        if progress:
                            progress(Progress("finish", i, len(sinks.all()), 0, 0, _sink_name(sink)))
                        sink.close()
                except BaseException:
                    sinks.abort()
                    raise
                if digests[0] == digests[1] and ft.path.resolve() != inf.path.resolve():
                    note = "finetuned and inferior have identical weights: the expert equals finetuned"
                    notes.append(note)
                    warnings.warn(note, ExtrapolationWarning, stacklevel=2)
                if check_model is not None and "gguf" in formats:
                    written = [bw.tmp / gguf_relpath(role, q) for q in quants for role in _roles(with_inferior)]
                    if progress:
                        progress(Progress("check", 0, 0, 0, 0, ", ".join(p.name for p in written)))
                    check_model(written)  # all in one go (runtime.check_gguf_runs: one child process)
                if "mlx" in formats:
                    _export_mlx_all(bw, hf_dirs, mlx_bits, mlx_group_size, progress)
                shutil.rmtree(bw.tmp / ".work", ignore_errors=True)
                if progress:
                    progress(Progress("hash", 0, 0, 0, 0, "manifest"))
                files = _file_entries(bw.tmp, formats, quants, with_inferior, mlx_bits, mlx_group_size)
                manifest = _manifest(ft, inf, mu, lam, alpha, digests, files, notes, time.perf_counter() - t0)
                bw.commit(manifest)
            except OSError as e:  # a full disk, mostly: one line, and the temporary folder goes
                raise write_error(e, bw, estimate_bytes(ft, formats, quants, with_inferior, mlx_bits)) from None
    return open_bundle(bw.out)


_BYTES_PER_WEIGHT = {"F32": 4, "F16": 2, "BF16": 2, "Q8_0": 34 / 32, "Q6_K": 0.82, "Q5_K_M": 0.71, "Q4_K_M": 0.6,
                     "Q4_0": 18 / 32}


def estimate_bytes(ft: Checkpoint, formats, quants, with_inferior: bool, mlx_bits) -> int:
    """About how many bytes a bundle of these formats takes (for the message of a full disk)."""
    n = sum(math.prod(t.shape) for t in ft.tensors.values())  # weights
    roles = len(_roles(with_inferior))
    total = 0
    if "gguf" in formats:
        total += roles * sum(int(n * _BYTES_PER_WEIGHT.get(q, 4)) for q in quants)
    if "hf" in formats:  # stored as read; quantized GGUF tensors as float32
        total += sum(t.nbytes if t.dtype in FLOAT_TAGS else math.prod(t.shape) * 4 for t in ft.tensors.values())
    if "mlx" in formats:
        total += roles * int(n * (4 if mlx_bits is None else mlx_bits / 8 * 1.1))
    return total


def write_error(e: OSError, bw: BundleWriter, need: int) -> BundleError:
    """One line for an OSError while writing the bundle: what was being written, and for a full disk the
    space the bundle needs and what is free on that device."""
    import errno

    where = bw.tmp or bw.out.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    name = e.filename or _newest_file(bw.tmp)
    if name:  # the file's final name, not its work name (x.gguf.part, x.gguf.unquantized.part, x.gguf.tmp)
        name = re.sub(r"(\.unquantized)?\.(part|tmp)$", "", Path(name).name)
    what = f"while writing {name}" if name else "while writing the bundle"
    full = e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EFBIG) or (
        e.errno is None and free is not None and free < (1 << 20))
    if full:
        return BundleError(f"{bw.out}: no space left on the device {what}: the bundle needs about "
                           f"{human_bytes(need)}, {human_bytes(free or 0)} free in {bw.out.parent} (nothing was kept)")
    return BundleError(f"{bw.out}: cannot write {what} ({os.strerror(e.errno) if e.errno else ' '.join(str(e).split())})")


def _newest_file(root: Path | None) -> str | None:
    """The file written last in the temporary folder: the one a write failed on."""
    if root is None:
        return None
    try:
        files = [f for f in root.rglob("*") if f.is_file() and f.name != LOCK_FILE]
        return str(max(files, key=lambda f: f.stat().st_mtime_ns)) if files else None
    except OSError:
        return None


def _manifest(ft: Checkpoint, inf: Checkpoint, mu, lam, alpha, digests, files, notes, seconds) -> dict:
    return build_manifest(
        mu=mu, lam=lam, alpha=alpha, arch=ft.arch, tokenizer_hash=ft.tokenizer_hash(),
        sources={"finetuned": {"path": str(ft.path.absolute()), "format": ft.format, "content_sha256": digests[0]},
                 "inferior": {"path": str(inf.path.absolute()), "format": inf.format, "content_sha256": digests[1]}},
        files=files, warnings=notes,
        summary={"seconds": round(seconds, 3), "tensors": len(ft.tensors), "input_bytes": ft.nbytes + inf.nbytes,
                 "output_bytes": _total_bytes(files), "peak_rss_bytes": peak_rss_bytes()})


def _sink_name(sink) -> str:
    return Path(getattr(sink, "out_path", None) or sink.out_dir).name


def _export_mlx_all(bw, hf_dirs: dict[str, Path], bits, group_size, progress) -> None:
    from .mlx import export_mlx

    for i, (role, src) in enumerate(hf_dirs.items()):
        if progress:
            progress(Progress("mlx", i, len(hf_dirs), 0, 0, role))
        export_mlx(src, bw.path(mlx_relpath(role)), bits=bits, group_size=group_size)


def _file_entries(root: Path, formats, quants, with_inferior, mlx_bits, mlx_group_size) -> dict:
    """The manifest's file entries; the files are hashed in parallel (hashlib releases the GIL)."""
    roles = _roles(with_inferior)
    files: dict = {}
    with ThreadPoolExecutor(min(_cores(), 4)) as pool:
        if "gguf" in formats:
            files["gguf"] = {q: {r: pool.submit(file_entry, root, gguf_relpath(r, q)) for r in roles} for q in quants}
        if "mlx" in formats:
            files["mlx"] = {r: pool.submit(file_entry, root, mlx_relpath(r), bits=mlx_bits, group_size=mlx_group_size)
                            for r in roles}
        if "hf" in formats:
            files["hf"] = {"expert": pool.submit(file_entry, root, hf_relpath("expert"))}
    return {fmt: _results(entries) for fmt, entries in files.items()}


def _results(tree):
    return {k: _results(v) for k, v in tree.items()} if isinstance(tree, dict) else tree.result()


def _total_bytes(files: dict) -> int:
    total = sum(e["bytes"] for per_role in files.get("gguf", {}).values() for e in per_role.values())
    return total + sum(e["bytes"] for fmt in ("mlx", "hf") for e in files.get(fmt, {}).values())


def extrapolate(finetuned, inferior, out, *, mu, force: bool = False, progress: ProgressFn | None = None,
                max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write the expert alone as an HF folder at `out` (sharded safetensors, config, tokenizer), atomically.

    Inputs are HF folders or GGUF files (as convert --to hf); the same validation as convert. Returns the folder.
    """
    mu = check_mu(mu)
    bw = BundleWriter(out, force, marker="config.json")
    with _open(finetuned) as ft, _open(inferior) as inf:
        notes = validate_pair(ft, inf, mu)
        check_support(ft, ["hf"])
        for note in notes:
            warnings.warn(note, ExtrapolationWarning, stacklevel=2)
        with bw:
            sinks = _Sinks()
            try:
                sinks.hf["expert"] = _hf_sink(bw.tmp, ft, max_shard_bytes)
                _run_pass(ft, inf, mu, sinks, progress)
                sinks.hf["expert"].close()
            except BaseException:
                sinks.abort()
                raise
            return bw.commit(None)
