"""Faults: SIGTERM and kill -9 during convert leave nothing after the next convert; a full filesystem gives
one line in convert and batch (and batch resumes to every id exactly once); two batch writers on one output
are refused."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from rt_models import N_THREADS, bundle_dir, pair_dir

from epicode_edge.apps import batch
from epicode_edge.cli import main
from epicode_edge.converters.bundle import open_bundle
from epicode_edge.errors import InputError

# Runs the convert CLI with a progress callback that announces each tensor and then waits a little, so that
# the test can signal the process while it is writing.
_SLOW_CONVERT = textwrap.dedent("""
    import sys, time
    from epicode_edge import cli
    def update(self, p):
        print("tensor", p.tensors_done, flush=True)
        time.sleep(0.2)
    cli._ConvertBar.update = update
    sys.argv = ["epicode-edge", "convert"] + sys.argv[1:]
    cli.main()
""")


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))


def start_slow_convert(pair, out):
    args = ["--finetuned", str(pair / "finetuned"), "--inferior", str(pair / "inferior"), "--mu", "0.5",
            "--to", "gguf,hf", "--quant", "F32", "-o", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline().startswith("tensor"), proc.stderr.read()
    proc.stdout.readline()  # writing is under way
    return proc


def convert_cli(pair, out, *extra):
    r = CliRunner().invoke(main, ["convert", "--finetuned", str(pair / "finetuned"), "--inferior",
                                  str(pair / "inferior"), "--mu", "0.5", "--quant", "F32", "-o", str(out), *extra])
    return r.exit_code, r.output


def test_sigterm_mid_convert_removes_the_temp_folder(tmp_path_factory, tmp_path):
    pair = pair_dir(tmp_path_factory)
    proc = start_slow_convert(pair, tmp_path / "b")
    assert any(p.name.startswith(".b.tmp-") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Terminated." in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_kill_9_mid_convert_is_cleaned_by_the_next_convert(tmp_path_factory, tmp_path):
    pair = pair_dir(tmp_path_factory)
    proc = start_slow_convert(pair, tmp_path / "b")
    proc.kill()
    proc.communicate(timeout=60)
    stale = [p.name for p in tmp_path.iterdir()]
    assert len(stale) == 1 and stale[0].startswith(".b.tmp-")
    code, out = convert_cli(pair, tmp_path / "b")
    assert code == 0, out
    assert [p.name for p in tmp_path.iterdir()] == ["b"]
    open_bundle(tmp_path / "b", verify=True)


# ------------------------------------------------------------------------------- a full filesystem


@contextmanager
def small_fs(path: Path, size: str):
    """A tmpfs of `size` mounted at path (root only; the test is skipped where mounting is not allowed)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_in_convert_is_one_line(tmp_path_factory, tmp_path):
    pair = pair_dir(tmp_path_factory)
    with small_fs(tmp_path / "fs", "300k") as fs:
        code, out = convert_cli(pair, fs / "b", "--to", "gguf,hf")
        assert code == 1, out
        errors = [line for line in out.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and "Traceback" not in out, out
        assert re.search(r"no space left on the device while writing ((expert|amateur)-F32\.gguf|model\.safetensors): "
                         r"the bundle needs about 1\.\d MB, [\d.]+ KB free in ", errors[0]), errors[0]
        assert list(fs.iterdir()) == []


def test_full_disk_in_a_shared_base_convert_is_one_line(tmp_path):
    from factory import make_hf_model, make_lora_pair

    base = make_hf_model(tmp_path / "base", "llama", seed=2)
    ft, inf = make_lora_pair(tmp_path / "adapters", base, rank=4, seed=3)
    with small_fs(tmp_path / "fs", "200k") as fs:
        r = CliRunner().invoke(main, ["convert", "--base", str(base), "--finetuned", str(ft), "--inferior", str(inf),
                                      "--mu", "0.5", "--quant", "F32", "-o", str(fs / "b")])
        assert r.exit_code == 1, r.output
        errors = [line for line in r.output.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and "Traceback" not in r.output, r.output
        assert "no space left on the device while writing base-F32.gguf" in errors[0]
        assert list(fs.iterdir()) == []


def test_full_disk_in_batch_is_one_line_and_resumes(tmp_path_factory, tmp_path):
    bundle = bundle_dir(tmp_path_factory)
    ids = list(range(40))  # ~10 KB of records: more than the one page left free below
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i, "prompt": f"Say {i}"}) + "\n" for i in ids))
    args = ["batch", str(bundle), str(tmp_path / "in.jsonl"), "--max-tokens", "2", "--quant", "F32", "--threads",
            str(N_THREADS)]
    with small_fs(tmp_path / "fs", "64k") as fs:
        filler = fs / "filler"
        with open(filler, "wb", buffering=0) as f:  # fill the file system, then free one page
            try:
                while True:
                    f.write(b"x" * 4096)
            except OSError:
                pass
        os.truncate(filler, filler.stat().st_size - 4096)
        r = CliRunner().invoke(main, args + ["-o", str(fs / "out.jsonl")])
        assert r.exit_code == 1, r.output
        errors = [line for line in r.output.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and "Traceback" not in r.output, r.output
        assert "no space left on the device" in errors[0] and "run the same command again to resume" in errors[0]
        done = [json.loads(line)["id"] for line in (fs / "out.jsonl").read_text().splitlines()]
        assert 0 < len(done) < len(ids)  # complete records only
        filler.unlink()
        r = CliRunner().invoke(main, args + ["-o", str(fs / "out.jsonl")])
        assert r.exit_code == 0, r.output
        records = [json.loads(line) for line in (fs / "out.jsonl").read_text().splitlines()]
        assert sorted(rec["id"] for rec in records) == ids and all("text" in rec for rec in records)


# ------------------------------------------------------------------------------- two writers


def test_two_batch_writers_on_one_output_are_refused(tmp_path_factory, tmp_path):
    bundle = bundle_dir(tmp_path_factory)
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": 1, "prompt": "hi"}) + "\n")
    out = tmp_path / "out.jsonl"
    with batch.prepare(tmp_path / "in.jsonl", out) as job:  # a first writer holds the output
        with pytest.raises(InputError, match="another batch run is writing to it"):
            batch.prepare(tmp_path / "in.jsonl", out)
        r = CliRunner().invoke(main, ["batch", str(bundle), str(tmp_path / "in.jsonl"), "-o", str(out)])
        assert r.exit_code == 1 and "Traceback" not in r.output
        assert "another batch run is writing to it" in r.output
        assert job.pending
    assert not out.exists()  # the first writer wrote nothing: no empty file is left either
    with batch.prepare(tmp_path / "in.jsonl", out, retry_errors=True) as job:  # the lock was released
        assert len(job.pending) == 1


def test_the_lock_survives_a_retry_errors_rewrite(tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": 1, "prompt": "hi"}) + "\n")
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": 1, "line": 1, "error": "boom"}) + "\n")
    with batch.prepare(tmp_path / "in.jsonl", out, retry_errors=True) as job:
        assert out.read_text() == "" and len(job.pending) == 1
        with pytest.raises(InputError, match="another batch run"):
            batch.prepare(tmp_path / "in.jsonl", out)
