"""Faults: SIGTERM and kill -9 during convert (or during a forced replace) leave nothing after the next convert; a full filesystem gives
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
    cli._convert_progress = update
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


# Replaces the bundle at argv[1] (forced) and stops right after os.rename call argv[2] of the commit (1: the old
# bundle moved aside, 2: the new one moved in): "die" is kill -9 there, "wait" stays alive until stdin closes.
_STOP_REPLACING = textwrap.dedent("""
    import os, sys
    from epicode_edge.converters.bundle import BundleWriter
    rename, moved = os.rename, []
    def stop_after(src, dst):
        rename(src, dst)
        moved.append(dst)
        if len(moved) == int(sys.argv[2]):
            print(moved[0], flush=True)  # the old bundle's folder
            os._exit(9) if sys.argv[3] == "die" else sys.stdin.read()
    os.rename = stop_after
    bw = BundleWriter(sys.argv[1], force=True).__enter__()
    bw.path("gguf/expert-F32.gguf").write_bytes(b"x" * 1000)
    bw.commit({"format_version": 1})
""")


def stop_replacing(out, after: int, how: str):
    return subprocess.Popen([sys.executable, "-c", _STOP_REPLACING, str(out), str(after), how],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())


def test_killed_forced_replace_is_cleaned_by_the_next_convert(tmp_path_factory, tmp_path):
    """A forced replace killed with the old bundle moved aside leaves .b.old-XXXXXXXX (and, killed before the new
    one took the name, its .b.tmp-XXXXXXXX): the next convert to b removes them, and only them."""
    pair = pair_dir(tmp_path_factory)
    out = tmp_path / "b"
    foreign = [".b.old-notours", ".b.old-0123456789", ".bb.old-01234567", ".b.tmp-0123abcd", "b.old-01234567"]
    for name in foreign:
        (tmp_path / name).mkdir()
    (tmp_path / ".b.old-abcdef01").write_text("a file, not a folder")
    foreign.append(".b.old-abcdef01")

    def convert_force():
        code, msg = convert_cli(pair, out, "--force")
        assert code == 0, msg
        b = open_bundle(out, verify=True)
        assert b.quants == ["F32"] and (out / "gguf" / "expert-F32.gguf").stat().st_size > 1000

    convert_force()
    # killed with the old bundle moved aside, the new one not yet in place: no bundle under the name
    killed_aside = stop_replacing(out, 1, "die")
    old_aside = Path(killed_aside.communicate(timeout=60)[0].strip())
    assert not out.exists() and (old_aside / "epicode.json").is_file()
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".b.tmp-") and p.name not in foreign]) == 1
    convert_force()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["b"] + foreign)

    # killed with the new bundle in place, the old one not yet deleted
    killed_in_place = stop_replacing(out, 2, "die")
    old_killed = Path(killed_in_place.communicate(timeout=60)[0].strip())
    assert (old_killed / "epicode.json").is_file()
    live = stop_replacing(out, 2, "wait")  # a writer in the middle of its replace: not ours to remove
    try:
        old_live = Path(live.stdout.readline().strip())
        assert (old_live / "epicode.json").is_file()
        convert_force()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["b", old_live.name] + foreign)
    finally:
        live.stdin.close()
        live.wait(timeout=60)
    assert not old_live.exists()  # the live writer finished its own replace
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["b"] + foreign)


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
