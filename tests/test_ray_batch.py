"""`batch --ray` (apps/ray_batch.py): the JSONL job as a Ray Data pipeline on a local Ray with 2 CPUs.

The worker's bundle checks run without Ray; the rest needs `ray[data]` (pip install -e '.[ray]') and is
skipped without it. Each Ray test starts its own local Ray (about 10 s on 2 cores) and shuts it down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from epicode_edge.apps import batch, ray_batch
from epicode_edge.engine_options import EngineOptions
from epicode_edge.errors import BundleError
from rt_models import N_THREADS, bundle_dir

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 48
PROMPTS = ["Hello there", "What is 17 + 25?", "Café crème", "def add(a, b):", "Law, math and logic", "東京"]


def _needs_ray():
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as e:
        pytest.skip(f"ray[data] is not installed ({e.name} missing): pip install -e '.[ray]'")


def _lines(path):
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines()]


def _no_timings(recs):
    return {(r["id"], r["line"]): {k: v for k, v in r.items() if k != "timings"} for r in recs}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return bundle_dir(tmp_path_factory)


def _spec(path, **kw):
    from epicode_edge.version import __version__

    spec = {"bundle": str(path), "manifest_sha256": ray_batch.manifest_digest(path), "version": __version__,
            "verify": True, "load": {"backend": "llama.cpp", "quant": "F32", "n_ctx": 256, "n_threads": 1},
            "defaults": {}, "compare": False, "parallel": 2}
    spec.update(kw)
    return spec


# ---------------------------------------------------------------------------------------------
# the worker's checks of its bundle (no Ray needed: what each actor runs before loading)
# ---------------------------------------------------------------------------------------------


def test_worker_checks_name_the_missing_or_different_bundle(bundle, tmp_path):
    import shutil

    with pytest.raises(BundleError, match=f"{tmp_path / 'nowhere'}: no such bundle folder"):
        ray_batch.open_on_worker(_spec(bundle, bundle=str(tmp_path / "nowhere")))
    with pytest.raises(BundleError, match=r"epicode\.json: not the driver's bundle"):
        ray_batch.open_on_worker(_spec(bundle, manifest_sha256="0" * 64))
    with pytest.raises(BundleError, match=r"on this worker, 0\.0\.0 on the driver"):
        ray_batch.open_on_worker(_spec(bundle, version="0.0.0"))
    copy = tmp_path / "copy"  # a worker's copy whose model file changed (same size): sha256 names it
    shutil.copytree(bundle, copy)
    f = next((copy / "gguf").glob("amateur-F32.gguf"))
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="amateur-F32.gguf"):
        ray_batch.open_on_worker(_spec(copy))
    with ray_batch.open_on_worker(_spec(copy, verify=False)) as rt:  # sizes only: loads
        assert rt.quant == "F32"


def test_without_ray_one_line_says_how_to_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **kw):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}", name=name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    from epicode_edge.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match=r"pip install 'epicode-edge\[ray\]'"):
        ray_batch.import_ray()


# ---------------------------------------------------------------------------------------------
# on a local Ray (2 CPUs)
# ---------------------------------------------------------------------------------------------


def _input(path):
    """50 lines: 48 requests (prompts and messages, per-line overrides) and 2 bad lines."""
    lines = []
    for i in range(48):
        obj = {"id": f"r{i}", "prompt": f"{PROMPTS[i % len(PROMPTS)]} #{i}"}
        if i % 7 == 3:
            obj = {"id": i, "messages": [{"role": "system", "content": "Be terse."},
                                         {"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
        if i % 11 == 5:
            obj["max_tokens"] = 5
        lines.append(json.dumps(obj, ensure_ascii=False))
    lines.insert(10, "{not json")
    lines.insert(30, json.dumps({"id": "typo", "prompt": "x", "temperature": 0.5}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cli(bundle, inp, out):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-c", "from epicode_edge.cli import main; main()", "batch", str(bundle), str(inp),
            "-o", str(out), "--backend", "llama.cpp", "--quant", "F32", "--n-ctx", "256", "--threads", "1",
            "--max-tokens", str(MAX_TOKENS), "--parallel", "2", "--actors", "2", "--ray"]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: Ray's processes included


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started (same session)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def _count(path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_ray_batch_equals_local_batch_and_resumes_after_kill(bundle, tmp_path):
    _needs_ray()
    from epicode_edge.runtime import load

    inp = _input(tmp_path / "in.jsonl")
    ref = tmp_path / "local.jsonl"
    with load(bundle, backend="llama.cpp", quant="F32", n_ctx=256, n_threads=N_THREADS) as rt:
        s = batch.run_batch(rt, inp, ref, max_tokens=MAX_TOKENS)  # one at a time: the reference
    assert (s.n_ok, s.n_errors) == (48, 2)
    want = _no_timings(_lines(ref))

    out = tmp_path / "ray.jsonl"
    proc = _cli(bundle, inp, out)
    try:
        t0 = time.time()
        while _count(out) < 3 and proc.poll() is None:  # the 2 bad lines, then the first decoded block
            assert time.time() - t0 < 300, "batch --ray wrote no block in 300 s"
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()[1]
        os.kill(proc.pid, signal.SIGTERM)  # the driver dies mid-run (batch has no cleanup of its own)
        _, err = proc.communicate(timeout=60)
    finally:
        _kill_group(proc)
    # by the signal, as a batch without --ray: not by ray.init's handler (sys.exit(15), a C++ stack dump)
    assert proc.returncode == -signal.SIGTERM and "SIGTERM received" not in err, (proc.returncode, err[-500:])
    killed_at = _lines(out)
    assert 2 < len(killed_at) < 50  # killed mid-way: some records, not all
    with open(out, "ab") as f:  # and as if it died in the middle of writing a record
        f.write(b'{"id": "r47", "line": 50, "text": "hal')

    proc = _cli(bundle, inp, out)
    try:
        _, err = proc.communicate(timeout=600)
    finally:
        _kill_group(proc)
    assert proc.returncode == 0, err
    assert "dropped a truncated last line" in err
    summary = err.strip().splitlines()[-1]
    assert f"{50 - len(killed_at)} ok, 0 errors, {len(killed_at)} already done" in summary, err

    got = _lines(out)
    keys = [(r["id"], r["line"]) for r in got]
    assert len(keys) == len(set(keys)) == 50  # every id exactly once
    assert _no_timings(got) == want  # the same records as the local batch: greedy text and counts
    assert sum(r["completion_tokens"] for r in got if "text" in r) > 48 * 5
    assert {r["error"].split(":")[0] for r in got if "error" in r} == {"line 11", "line 31"}


def test_a_worker_that_cannot_verify_the_bundle_stops_the_run_with_one_line(bundle, tmp_path, monkeypatch):
    _needs_ray()
    inp = _input(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(ray_batch, "manifest_digest", lambda b: "0" * 64)  # the driver's differs from theirs
    sigterm = signal.getsignal(signal.SIGTERM)
    with batch.prepare(inp, out) as job:
        with pytest.raises(BundleError) as e:
            ray_batch.run_ray_job(bundle, job, num_cpus=2, actors=1, engine=EngineOptions(quant="F32", n_ctx=256),
                                  max_tokens=4)
    msg = str(e.value)
    assert msg.startswith("worker on ") and "epicode.json: not the driver's bundle" in msg and "\n" not in msg
    assert [r["line"] for r in _lines(out)] == [11, 31]  # the bad lines' records only; a rerun resumes
    assert signal.getsignal(signal.SIGTERM) is sigterm  # ray.init's own SIGTERM handler is gone again


def test_cli_ray_options_fail_with_one_line_before_ray_starts(bundle, tmp_path):
    from click.testing import CliRunner

    from epicode_edge.cli import main

    inp = _input(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    run = CliRunner().invoke
    res = run(main, ["batch", str(bundle), str(inp), "-o", str(out), "--actors", "2"])
    assert res.exit_code == 2 and "--actors applies to --ray only" in res.stderr
    _needs_ray()
    res = run(main, ["batch", str(tmp_path / "nowhere"), str(inp), "-o", str(out), "--ray"])
    assert res.exit_code == 1 and res.stderr == f"Error: {tmp_path / 'nowhere'}: no such bundle folder\n"
    assert not out.exists()  # nothing written, not even the bad lines' records
