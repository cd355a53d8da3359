"""A bundle is untrusted input: every manifest path stays inside the bundle, the whole manifest schema is
checked at load (one line naming the field), `info --verify` covers LoRA adapters, folders get the umask's
permissions, and stale temporary folders of dead writers are removed by the next writer."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bundle import write_bundle

from epicode_edge.cli import main
from epicode_edge.converters.bundle import (
    LOCK_FILE,
    MANIFEST,
    BundleWriter,
    check_manifest,
    describe,
    file_entry,
    open_bundle,
    remove_stale_temps,
)
from epicode_edge.errors import BundleError


def run_info(bundle, *extra):
    r = CliRunner().invoke(main, ["info", str(bundle), *extra])
    return r.exit_code, r.output


from cli_helpers import assert_one_line_error  # noqa: E402


@pytest.fixture
def good(tmp_path):
    out = write_bundle(tmp_path / "b")
    return out, json.loads((out / MANIFEST).read_text())


def rewrite(out, manifest):
    (out / MANIFEST).write_text(json.dumps(manifest))


# --------------------------------------------------------------------------------------- paths


@pytest.mark.parametrize("path", ["../../../../etc/passwd", "/etc/passwd", "gguf/../../outside.gguf",
                                  "gguf\\..\\..\\outside.gguf", "gguf/expert-Q8_0.gguf\x00.txt"])
def test_manifest_paths_never_leave_the_bundle(good, path):
    out, m = good
    outside = out.parent / "outside.gguf"
    outside.write_bytes(b"secret" * 100)
    m["files"]["gguf"]["Q8_0"]["expert"] = file_entry(out.parent, "outside.gguf")  # right size and sha256
    m["files"]["gguf"]["Q8_0"]["expert"]["path"] = path
    rewrite(out, m)
    with pytest.raises(BundleError, match="is not a relative path inside the bundle folder"):
        open_bundle(out)
    for extra in ((), ("--verify",)):
        assert_one_line_error(*run_info(out, *extra), "gguf Q8_0 expert", repr(path))


def test_symlinks_leading_out_are_refused(good, tmp_path):
    out, m = good
    target = tmp_path / "elsewhere.gguf"
    f = out / "gguf/expert-Q8_0.gguf"
    target.write_bytes(f.read_bytes())  # same size and sha256: only the location gives it away
    f.unlink()
    f.symlink_to(target)
    with pytest.raises(BundleError, match="leads outside the bundle folder"):
        open_bundle(out, verify=True)
    assert_one_line_error(*run_info(out), "expert-Q8_0.gguf", "leads outside the bundle folder")
    # another bundle's GGUF, through a symlinked folder
    other = write_bundle(tmp_path / "other")
    (out / "gguf").rename(out / "gguf-old")
    (out / "gguf").symlink_to(other / "gguf")
    assert_one_line_error(*run_info(out), "leads outside the bundle folder")


def test_a_symlink_inside_the_bundle_is_fine(good):
    out, m = good
    (out / "alias.gguf").symlink_to(out / "gguf/expert-Q8_0.gguf")
    m["files"]["gguf"]["Q8_0"]["expert"]["path"] = "alias.gguf"
    rewrite(out, m)
    assert open_bundle(out, verify=True).gguf("expert").name == "alias.gguf"


def test_model_folders_hold_no_symlink_out(tmp_path):
    out = write_bundle(tmp_path / "b", mlx=True)
    (out / "mlx/expert/extra.safetensors").symlink_to("/etc/hostname")  # not listed, but an engine would glob it
    assert_one_line_error(*run_info(out), "extra.safetensors", "leads outside the bundle folder")


# --------------------------------------------------------------------------------------- schema

def _set(m, dotted, value):
    keys = dotted.split(".")
    d = m
    for k in keys[:-1]:
        d = d[k]
    if value is _DELETE:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value


_DELETE = object()

SCHEMA_CASES = [
    ("files.gguf", ["Q8_0"], "'files.gguf'"),
    ("files.gguf.Q8_0.expert.bytes", _DELETE, "'files.gguf.Q8_0.expert.bytes'"),
    ("files.gguf.Q8_0.expert.bytes", "700", "'files.gguf.Q8_0.expert.bytes'"),
    ("files.gguf.Q8_0.expert.bytes", True, "'files.gguf.Q8_0.expert.bytes'"),
    ("files.gguf.Q8_0.expert.sha256", _DELETE, "'files.gguf.Q8_0.expert.sha256'"),
    ("files.gguf.Q8_0.expert.sha256", "0" * 63, "'files.gguf.Q8_0.expert.sha256'"),
    ("files.gguf.Q8_0.expert.path", 7, "'files.gguf.Q8_0.expert.path'"),
    ("files.gguf.Q8_0.expert", "gguf/expert-Q8_0.gguf", "'files.gguf.Q8_0.expert'"),
    ("files.gguf.Q8_0.hacker", {"path": "x", "bytes": 1, "sha256": "0" * 64}, "'files.gguf.Q8_0.hacker'"),
    ("files.gguf.Q8_0", {}, "'files.gguf.Q8_0'"),
    ("sources", "/ft", "'sources'"),
    ("sources.finetuned", ["x"], "'sources.finetuned'"),
    ("warnings", 3, "'warnings'"),
    ("warnings", [1], "'warnings[0]'"),
    ("summary", {"seconds": "fast"}, "'summary.seconds'"),
    ("mu", float("nan"), "'mu'"),
    ("mu", float("inf"), "'mu'"),
    ("mu", -0.5, "'mu'"),
    ("mu", True, "'mu'"),
    ("mu", "0.3", "'mu'"),
    ("defaults.lambda", -1, "'defaults.lambda'"),
    ("defaults.lambda", float("nan"), "'defaults.lambda'"),
    ("defaults.alpha", 0, "'defaults.alpha'"),
    ("defaults.alpha", 1.5, "'defaults.alpha'"),
    ("defaults", [], "'defaults'"),
    ("format_version", "1", "'format_version'"),
    ("format_version", True, "'format_version'"),
    ("format_version", 0, "'format_version'"),
    ("arch", ["llama"], "'arch'"),
    ("layout", "weird", "'layout'"),
    ("layout", "shared-base", "'files.lora'"),
    ("files", {"gguf": {}}, "no files listed"),
]


@pytest.mark.parametrize("field,value,expect", SCHEMA_CASES, ids=[f"{c[0]}={c[1]!r}"[:40] for c in SCHEMA_CASES])
def test_manifest_schema_one_line_naming_the_field(good, field, value, expect):
    out, m = good
    _set(m, field, value)
    rewrite(out, m)
    with pytest.raises(BundleError, match="invalid manifest"):
        open_bundle(out)
    assert_one_line_error(*run_info(out), "epicode.json", expect)


def test_unknown_top_level_fields_are_allowed(good):
    out, m = good
    m["tune"] = {"mu_grid": [0.1]}
    rewrite(out, m)
    assert open_bundle(out).mu == 0.3


def test_deeply_nested_and_oversized_manifests(good):
    out, _ = good
    (out / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    assert_one_line_error(*run_info(out), "epicode.json", "nested too deeply")
    (out / MANIFEST).write_text("[]")
    assert_one_line_error(*run_info(out), "not an object")
    with open(out / MANIFEST, "w") as f:
        f.write('{"x": "' + "a" * (17 << 20) + '"}')
    assert_one_line_error(*run_info(out), "larger than 16 MB")


# --------------------------------------------------------------------------------------- lora


def _lora_bundle(tmp_path):
    """A hand-made shared-base bundle: a base 'GGUF' and two adapter files (any bytes)."""
    with BundleWriter(tmp_path / "lb") as bw:
        bw.path("gguf/base-Q8_0.gguf").write_bytes(b"base" * 50)
        files = {"gguf": {"Q8_0": {"base": file_entry(bw.tmp, "gguf/base-Q8_0.gguf")}}, "lora": {}}
        for which in ("finetuned", "inferior"):
            bw.path(f"lora/{which}.gguf").write_bytes(which.encode() * 40)
            files["lora"][which] = file_entry(bw.tmp, f"lora/{which}.gguf", r=4)
        m = {"format_version": 1, "layout": "shared-base", "mu": 0.5, "defaults": {"lambda": 0.5, "alpha": 0.1},
             "files": files, "lora": {"scales": {"expert": {"finetuned": 1.5, "inferior": -0.5},
                                                 "amateur": {"finetuned": 1.0}}}}
        return bw.commit(m)


def test_verify_covers_lora_adapters(tmp_path):
    out = _lora_bundle(tmp_path)
    assert open_bundle(out, verify=True).roles == ["expert", "amateur"]
    m = json.loads((out / MANIFEST).read_text())
    f = out / "lora/inferior.gguf"
    data = f.read_bytes()
    f.write_bytes(data[:-1] + b"!")  # scrambled, same size
    assert_one_line_error(*run_info(out, "--verify"), "inferior.gguf: sha256 differs")
    f.write_bytes(data[:-5])  # truncated
    assert_one_line_error(*run_info(out), "inferior.gguf: size 315 != 320")
    f.write_bytes(data)
    m["files"]["lora"]["inferior"]["sha256"] = "0" * 64  # zeroed
    rewrite(out, m)
    assert_one_line_error(*run_info(out, "--verify"), "inferior.gguf: sha256 differs")
    m["files"]["lora"]["inferior"]["path"] = "/etc/passwd"
    rewrite(out, m)
    assert_one_line_error(*run_info(out), "lora inferior", "is not a relative path inside the bundle")


@pytest.mark.parametrize("scales,expect", [
    ({"expert": {"finetuned": float("nan")}}, "lora.scales.expert.finetuned"),
    ({"expert": {"finetuned": 1e300}}, "lora.scales.expert.finetuned"),
    ({"expert": {"other": 1.0}}, "lora.scales.expert.other"),
    ({"wizard": {"finetuned": 1.0}}, "lora.scales.wizard"),
    ([1], "lora"),
])
def test_lora_scales_are_checked(tmp_path, scales, expect):
    out = _lora_bundle(tmp_path)
    m = json.loads((out / MANIFEST).read_text())
    m["lora"] = {"scales": scales} if isinstance(scales, dict) else scales
    rewrite(out, m)
    assert_one_line_error(*run_info(out), expect)


# --------------------------------------------------------------------------------------- writing


def test_bundle_folders_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = write_bundle(tmp_path / "b", mlx=True)
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o755
    assert (out / "gguf").stat().st_mode & 0o777 == 0o755
    assert (out / MANIFEST).stat().st_mode & 0o777 == 0o644
    assert not (out / LOCK_FILE).exists()


_DIE_WRITING = textwrap.dedent("""
    import os, sys
    from epicode_edge.converters.bundle import BundleWriter
    bw = BundleWriter(sys.argv[1]).__enter__()
    bw.path("gguf/expert-Q8_0.gguf").write_bytes(b"x" * 1000)
    print(bw.tmp, flush=True)
    os._exit(9) if sys.argv[2] == "die" else sys.stdin.read()
""")


def test_stale_temp_folders_of_dead_writers_are_removed(tmp_path):
    out = tmp_path / "b"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    live = subprocess.Popen([sys.executable, "-c", _DIE_WRITING, str(out), "live"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        busy = tmp_path / live.stdout.readline().strip().rsplit("/", 1)[-1]
        dead = subprocess.run([sys.executable, "-c", _DIE_WRITING, str(out), "die"], capture_output=True, text=True,
                              env=env)
        stale = tmp_path / dead.stdout.strip().rsplit("/", 1)[-1]
        assert stale.is_dir() and (stale / LOCK_FILE).is_file() and busy.is_dir()  # the dead one left the live one
        foreign = tmp_path / ".b.tmp-notours"  # no lock file: not ours to remove
        foreign.mkdir()
        assert remove_stale_temps(out) == [stale]
        assert not stale.exists() and busy.is_dir() and foreign.is_dir()
        dead = subprocess.run([sys.executable, "-c", _DIE_WRITING, str(out), "die"], capture_output=True, text=True,
                              env=env)
        write_bundle(out)  # a writer cleans up too, and leaves the live one alone
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".b.tmp-notours", busy.name, "b"])
    finally:
        live.stdin.close()
        live.wait()


# --------------------------------------------------------------------------------------- properties

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20)

FIELDS = ["format_version", "mu", "defaults", "defaults.lambda", "defaults.alpha", "files", "files.gguf",
          "files.gguf.Q8_0", "files.gguf.Q8_0.expert", "files.gguf.Q8_0.expert.path", "files.gguf.Q8_0.expert.bytes",
          "files.gguf.Q8_0.expert.sha256", "sources", "sources.finetuned", "warnings", "summary", "arch", "layout",
          "lora", "files.mlx", "files.lora", "created", "tokenizer_hash"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values)
def test_check_manifest_never_raises_anything_but_bundle_error(value):
    try:
        check_manifest(value)
    except BundleError as e:
        assert "\n" not in str(e)


_PROP: dict = {}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=json_values)
def test_any_manifest_the_loader_accepts_describes_cleanly(tmp_path_factory, field, value):
    if "bundle" not in _PROP:
        _PROP["bundle"] = write_bundle(tmp_path_factory.mktemp("prop") / "b", mlx=True)
        _PROP["manifest"] = (_PROP["bundle"] / MANIFEST).read_text()
    out, m = _PROP["bundle"], json.loads(_PROP["manifest"])
    try:
        _set(m, field, value)
    except (KeyError, TypeError):
        return
    (out / MANIFEST).write_text(json.dumps(m))
    try:
        b = open_bundle(out)
    except BundleError as e:
        assert "\n" not in str(e)
        return
    assert math.isfinite(b.mu) and b.mu >= 0 and math.isfinite(b.lam) and 0 < b.alpha <= 1
    assert all(isinstance(line, str) for line in describe(b))
    for q in b.quants:
        for role in b.manifest["files"]["gguf"][q]:
            assert out in b.gguf(role, q).resolve().parents


# --------------------------------------------------------------------------------------- every command

def _escape(out, m):
    m["files"]["gguf"]["Q8_0"]["expert"]["path"] = "../../../../etc/passwd"
    return "is not a relative path inside the bundle"


def _symlink(out, m):
    f = out / "gguf/amateur-Q8_0.gguf"
    target = out.parent / "elsewhere"
    target.write_bytes(f.read_bytes())
    f.unlink()
    f.symlink_to(target)
    return "leads outside the bundle folder"


def _nan_mu(out, m):
    m["mu"] = float("nan")
    return "field 'mu'"


def _no_bytes(out, m):
    del m["files"]["gguf"]["Q8_0"]["amateur"]["bytes"]
    return "'files.gguf.Q8_0.amateur.bytes'"


HOSTILE_BUNDLES = {"escape": _escape, "symlink": _symlink, "nan-mu": _nan_mu, "no-bytes": _no_bytes}


@pytest.mark.parametrize("command", ["info", "info-verify", "generate", "chat", "batch", "eval"])
@pytest.mark.parametrize("case", sorted(HOSTILE_BUNDLES))
def test_every_command_refuses_a_hostile_bundle_with_one_line(tmp_path, case, command):
    out = write_bundle(tmp_path / "b")
    m = json.loads((out / MANIFEST).read_text())
    expect = HOSTILE_BUNDLES[case](out, m)
    rewrite(out, m)
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": 1, "prompt": "hi", "answer": "1"}) + "\n")
    args = {"info": ["info", out], "info-verify": ["info", out, "--verify"], "generate": ["generate", out, "hi"],
            "chat": ["chat", out], "batch": ["batch", out, tmp_path / "in.jsonl", "-o", tmp_path / "res.jsonl"],
            "eval": ["eval", out, tmp_path / "in.jsonl", "-o", tmp_path / "ev"]}[command]
    before = sorted(p.name for p in tmp_path.iterdir())
    r = CliRunner().invoke(main, [str(a) for a in args], input="hi\n")
    assert_one_line_error(r.exit_code, r.output, expect)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written: no results, no eval folder
