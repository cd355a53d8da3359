"""`batch --ray`: the JSONL batch job of apps/batch.py as a Ray Data pipeline, on a local Ray or a cluster.

    job = batch.prepare("in.jsonl", "out.jsonl")        # parse, resume, repair, lock: the local batch's own
    summary = run_ray_job("bundle/", job, address=None, threads=1, parallel=4, max_tokens=128)

The pipeline: the pending requests become a dataset (ray.data.from_items, one row a request); map_batches
hands blocks of `block_size` requests to a fixed pool of `actors` Decoder actors (ActorPoolStrategy), each
holding `threads` CPUs (and one GPU with n_gpu_layers != 0); an actor loads the bundle once and decodes its
blocks with Runtime.stream_many (through batch.job_records: the local batch's record code, so the records
are the same, greedy text and token counts included). The driver (this process) writes each block's records
as it arrives, in completion order, through the job's locked output: one writer, the same record format,
the same resume rule. Bad input lines need no model: the driver writes their error records first.

How the bundle reaches the workers: by path. BUNDLE must be at the same absolute path on every node that runs
an actor (a shared filesystem such as NFS, or a copy at that path on each node; `ray start` workers need
epicode-edge[ray] installed too, the same version). Before loading, each actor checks its copy: the
manifest byte for byte against the driver's (sha256), every listed file present with its size and, with
verify=True (the default), its sha256, and its own epicode-edge version against the driver's. An actor that
fails any of it (or cannot load the models) stops the run with one line naming the node and the file;
records already written stay, and the same command resumes.

Local Ray (address=None): a private instance with num_cpus (default: all cores), shut down at the end.
A cluster: address is given to ray.init ("auto" on a node of the cluster, or the head's "HOST:6379"). If
the caller has already called ray.init, that session is used and left running. Summary.seconds counts from
the start of the run: Ray's start and the actors' loading included.

Library code: never prints; progress(done, total, record_or_None) as in apps/batch.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..engine_options import EngineOptions
from ..errors import BackendError, BundleError, EpicodeError, ParameterError, UnsupportedError
from . import batch
from .batch import Job, Request, Summary



class RayJobError(EpicodeError):
    """Ray could not start, connect, or run the pipeline (an actor died, a node was lost)."""


def import_ray():
    """ray and ray.data, or one line saying how to install them."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise UnsupportedError(f"batch --ray needs Ray Data ({e.name or 'ray'} is missing): "
                               "pip install 'epicode-edge[ray]'") from None
    return ray


def manifest_digest(bundle) -> str:
    """sha256 of the bundle's manifest: what every worker's copy must match."""
    from ..converters.bundle import MANIFEST, open_bundle

    b = open_bundle(bundle)
    return hashlib.sha256((b.path / MANIFEST).read_bytes()).hexdigest()


def run_ray_job(bundle, job: Job, *, address: str | None = None, num_cpus: int | None = None,
                actors: int | None = None, threads: int = 1, parallel: int = 1, block_size: int | None = None,
                verify: bool = True, compare: bool = False, progress=None, engine: EngineOptions | None = None,
                **defaults) -> Summary:
    """Run the pending requests of `job` (from batch.prepare) on Ray actors, appending records to its output.

    address: None = a local Ray (num_cpus CPUs, default all cores), else a cluster's address. actors: the
    pool size (default: the CPUs (GPUs with n_gpu_layers != 0) over threads, at most one per block).
    threads: CPUs per actor, and llama.cpp's threads in it. parallel: requests decoded together in an actor.
    block_size: requests per block (default max(4, 4 * parallel)). engine: how each actor loads the bundle,
    as runtime.load() takes it (its n_threads is `threads`). defaults: decoding settings and `system`, as run_job's.
    """
    for name, v, lo in (("threads", threads, 1), ("parallel", parallel, 1), ("actors", actors, 1),
                        ("block_size", block_size, 1), ("num_cpus", num_cpus, 1)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < lo):
            raise ParameterError(f"{name} must be an integer >= {lo}, got {v!r}")
    if job.out is None:
        raise ParameterError("the job is closed (its output is no longer locked): prepare it again")
    engine = replace(EngineOptions.of(engine), n_threads=threads)
    ray = import_ray()
    from ..version import __version__

    bundle = Path(os.path.abspath(Path(bundle).expanduser()))  # the workers' working folders differ from ours
    spec = {"bundle": str(bundle), "manifest_sha256": manifest_digest(bundle), "version": __version__,
            "verify": verify, "load": engine.changed(), "defaults": defaults,
            "compare": compare, "parallel": parallel}  # (a bad bundle fails here, before anything is written)
    summary = Summary(n_skipped=job.skipped, duplicates=list(job.duplicates), output_path=job.output_path)
    writer = _Writer(job, summary, progress)
    requests = [it for it in job.pending if isinstance(it, Request)]
    bad_lines = [it for it in job.pending if not isinstance(it, Request)]  # their records need no model
    if not requests:
        for rec in bad_lines:
            writer.write(rec)
        return writer.finish()
    block_size = block_size or max(4, 4 * parallel)
    n_blocks = -(-len(requests) // block_size)
    gpus = 1 if engine.n_gpu_layers else 0
    with _ray_session(ray, address, num_cpus), _quiet_ray_data():  # (Ray unreachable: nothing written)
        for rec in bad_lines:
            writer.write(rec)
        actors = min(actors or _default_actors(ray, threads, gpus), n_blocks)
        ds = ray.data.from_items([{"request": json.dumps(asdict(r), ensure_ascii=False)} for r in requests],
                                 override_num_blocks=n_blocks)
        with warnings.catch_warnings():  # ray_remote_args_fn: deprecated, the only way to max_restarts (< 2.64)
            warnings.simplefilter("ignore", DeprecationWarning)
            out = ds.map_batches(Decoder, fn_constructor_kwargs={"spec": spec}, batch_size=block_size,
                                 compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=threads,
                                 num_gpus=gpus, batch_format="numpy", ray_remote_args_fn=_no_restarts)
        try:
            for block in out.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
                for fatal in block["fatal"]:
                    if fatal:
                        kind, message = json.loads(str(fatal))
                        raise _ERRORS.get(kind, RayJobError)(message)
                for line in block["record"]:
                    writer.write(json.loads(str(line)))
        except ray.exceptions.RayError as e:  # an actor or node died (not a request's failure: those are records)
            raise RayJobError(f"Ray: {_first_line(e)} ({writer.n} records written; run the same command again "
                           "to resume)") from None
    return writer.finish()


def _no_restarts() -> dict:
    """An actor that dies stops the run (one line; a rerun resumes). Ray Data's default restarts it and
    retries its block forever: an engine that crashes on every start (SIGILL, out of memory) would hang."""
    return {"max_restarts": 0}


_ERRORS = {"BundleError": BundleError, "BackendError": BackendError}  # what a worker's failure is raised as


def _fatal(e: BaseException) -> str:
    """A worker's failure as the driver raises it: [error class name, one line naming the node]."""
    what = _one_line(e) if isinstance(e, EpicodeError) else f"{type(e).__name__}: {_one_line(e)}"
    return json.dumps([type(e).__name__, f"worker on {socket.gethostname()}: {what}"])


def _first_line(e: BaseException) -> str:
    for line in str(e).splitlines():
        if line.strip():
            return " ".join(line.replace("\x1b[36m", "").replace("\x1b[39m", "").split())
    return type(e).__name__


def _default_actors(ray, threads: int, gpus: int) -> int:
    res = ray.cluster_resources()
    n = int(res.get("CPU", 1) // threads)
    if gpus:
        n = min(n, int(res.get("GPU", 0)))
        if n < 1:
            raise RayJobError("n_gpu_layers asks for a GPU per actor, but the Ray cluster has no GPU")
    return max(1, n)


@contextmanager
def _ray_session(ray, address: str | None, num_cpus: int | None):
    """ray.init (local or the cluster) unless the caller already did; shut down what we started."""
    if ray.is_initialized():
        yield
        return
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    if address is not None and num_cpus is not None:
        raise ParameterError("num_cpus applies to a local Ray only (a cluster has its own)")
    sigterm = signal.getsignal(signal.SIGTERM)  # ray.init sets its own (sys.exit): ours again at once
    try:
        try:
            if address is None:
                ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, **kw)
            else:
                ray.init(address=address, **kw)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = "a local Ray" if address is None else f"the Ray cluster at {address}"
            raise RayJobError(f"cannot start or reach {where}: {_first_line(e)}") from None
        _restore_sigterm(sigterm)  # during the job too: a SIGTERM stops it as the caller's handler says
        try:
            yield
        finally:
            ray.shutdown()
    finally:
        _restore_sigterm(sigterm)


def _restore_sigterm(handler) -> None:
    """ray.init installs its own SIGTERM handler (sys.exit(15): no cleanup message, the caller's handler
    bypassed); put the one there was before back, from the main thread."""
    if handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


@contextmanager
def _quiet_ray_data():
    """Ray Data's progress bars and logs (its plan, a 'progress bars disabled' warning) off while we run:
    we show our own progress."""
    import ray.data

    ctx, log = ray.data.DataContext.get_current(), logging.getLogger("ray.data")
    saved = ctx.enable_progress_bars, ctx.print_on_execution_start, log.level
    ctx.enable_progress_bars = ctx.print_on_execution_start = False
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved[:2]
        log.setLevel(saved[2])


class _Writer:
    """The driver's side: records appended to the job's locked output as they arrive, counted, reported."""

    def __init__(self, job: Job, summary: Summary, progress):
        self.job, self.summary, self.progress = job, summary, progress
        self.done, self.n = job.skipped, 0
        self.t0 = time.perf_counter()
        if progress:
            progress(self.done, job.total, None)

    def write(self, rec: dict) -> None:
        self.job.out.append(batch.dumps_record(rec).encode("utf-8"))
        batch.count_record(self.summary, rec)
        self.done += 1
        self.n += 1
        self.summary.seconds = time.perf_counter() - self.t0
        if self.progress:
            self.progress(self.done, self.job.total, rec)

    def finish(self) -> Summary:
        self.summary.seconds = time.perf_counter() - self.t0
        return self.summary


# ---------------------------------------------------------------------------------------------
# the worker side (runs in the Ray actors)
# ---------------------------------------------------------------------------------------------


class Decoder:
    """A Ray Data actor: checks and loads the bundle once, then turns blocks of requests into records.

    A failure to check or load is not raised here (Ray would restart the actor and bury the message in a
    traceback): every block this actor gets answers with it in its `fatal` column, and the driver stops."""

    def __init__(self, spec: dict):
        self.spec, self.runtime, self.fatal = spec, None, ""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a missing local path is never a hub id
        try:
            self.runtime = open_on_worker(spec)
        except Exception as e:  # noqa: BLE001 - a bug or an engine's own exception: named, never lost
            self.fatal = _fatal(e)

    def __call__(self, block: dict) -> dict:
        rows = [str(r) for r in block["request"]]
        if self.fatal:
            return {"record": [""], "fatal": [self.fatal]}
        items = [Request(**json.loads(r)) for r in rows]
        spec = self.spec
        try:
            records = list(batch.job_records(self.runtime, items, dict(spec["defaults"]), spec["compare"],
                                             max(1, min(spec["parallel"], len(items)))))
        except EpicodeError as e:  # the whole block failed (e.g. the KV caches do not fit)
            return {"record": [""], "fatal": [_fatal(e)]}
        return {"record": [batch.dumps_record(r) for r in records], "fatal": [""] * len(records)}

    def __del__(self):
        rt = getattr(self, "runtime", None)  # (ray.remote(Decoder) makes instances that never ran __init__)
        if rt is not None:
            rt.close()


def open_on_worker(spec: dict):
    """On a worker: the bundle at the driver's path, checked against the driver's (manifest, files, version),
    then loaded. Raises BundleError / BackendError naming the file."""
    from ..converters.bundle import MANIFEST, open_bundle
    from ..runtime import load
    from ..version import __version__

    if __version__ != spec["version"]:
        raise BundleError(f"epicode-edge {__version__} on this worker, {spec['version']} on the driver: install "
                          "the same version on every node")
    b = open_bundle(spec["bundle"], verify=spec["verify"])  # missing folder, file, size (sha256) named
    mpath = b.path / MANIFEST
    if hashlib.sha256(mpath.read_bytes()).hexdigest() != spec["manifest_sha256"]:
        raise BundleError(f"{mpath}: not the driver's bundle (its manifest differs): put the same bundle at "
                          "this path on every node")
    return load(b.path, **spec["load"])


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
