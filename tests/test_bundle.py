"""converters/bundle.py: atomic writing (temp folder, rename, force swap), manifest validation, info."""

import json
import sys

import pytest
from click.testing import CliRunner

from epicode_edge.cli import main
from epicode_edge.converters.bundle import (
    FORMAT_VERSION,
    MANIFEST,
    BundleWriter,
    describe,
    file_entry,
    open_bundle,
)
from epicode_edge.errors import BundleError


def write_bundle(out, mu=0.3, force=False, mlx=False):
    """A small hand-made bundle: two GGUF 'files' (any bytes) and optionally an MLX folder."""
    with BundleWriter(out, force) as bw:
        files = {"gguf": {"Q8_0": {}}}
        for role in ("expert", "amateur"):
            bw.path(f"gguf/{role}-Q8_0.gguf").write_bytes(role.encode() * 100)
            files["gguf"]["Q8_0"][role] = file_entry(bw.tmp, f"gguf/{role}-Q8_0.gguf")
        if mlx:
            bw.path("mlx/expert/model.safetensors").write_bytes(b"x" * 10)
            bw.path("mlx/expert/config.json").write_text("{}")
            files["mlx"] = {"expert": file_entry(bw.tmp, "mlx/expert", bits=4, group_size=64)}
        manifest = {"format_version": FORMAT_VERSION, "mu": mu, "defaults": {"lambda": 0.5, "alpha": 0.1},
                    "arch": "llama", "tokenizer_hash": "ab" * 32, "files": files,
                    "sources": {"finetuned": {"path": "/ft", "format": "hf", "content_sha256": "cd" * 32}}}
        return bw.commit(manifest)


def siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_write_and_open(tmp_path):
    out = write_bundle(tmp_path / "b", mlx=True)
    assert siblings(out) == ["b"]  # no temp folder left
    b = open_bundle(out, verify=True)
    assert (b.mu, b.lam, b.alpha) == (0.3, 0.5, 0.1)
    assert b.formats == ["gguf", "mlx"] and b.quants == ["Q8_0"] and b.roles == ["expert", "amateur"]
    assert b.gguf() == out / "gguf/expert-Q8_0.gguf" and b.gguf("amateur", "q8_0").read_bytes().startswith(b"amateur")
    assert b.mlx("expert") == out / "mlx/expert"
    text = "\n".join(describe(b))
    assert "mu = 0.3" in text and "Q8_0" in text and "4-bit, group 64" in text


def test_accessors_name_what_is_missing(tmp_path):
    b = open_bundle(write_bundle(tmp_path / "b"))
    with pytest.raises(BundleError, match="no GGUF files for quant Q4_K_M \\(the bundle has Q8_0\\)"):
        b.gguf("expert", "Q4_K_M")
    with pytest.raises(BundleError, match="no GGUF inferior for quant Q8_0"):
        b.gguf("inferior")
    with pytest.raises(BundleError, match="the bundle has no MLX amateur"):
        b.mlx("amateur")


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_an_exception_leaves_nothing(tmp_path, exc):
    with pytest.raises(exc):
        with BundleWriter(tmp_path / "b") as bw:
            bw.path("gguf/expert-Q8_0.gguf").write_bytes(b"half")
            assert bw.tmp.name.startswith(".b.tmp-") and bw.tmp.parent == tmp_path
            raise exc()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    out = write_bundle(tmp_path / "b", mu=0.3)
    with pytest.raises(BundleError, match="b: already exists \\(use --force to replace it\\)"):
        write_bundle(out, mu=0.5)
    assert open_bundle(out).mu == 0.3
    write_bundle(out, mu=0.5, force=True)
    assert open_bundle(out).mu == 0.5 and siblings(out) == ["b"]


def test_force_keeps_the_old_bundle_when_interrupted(tmp_path):
    out = write_bundle(tmp_path / "b", mu=0.3)
    with pytest.raises(KeyboardInterrupt):
        with BundleWriter(out, force=True) as bw:
            bw.path("gguf/x").write_bytes(b"1")
            raise KeyboardInterrupt
    assert open_bundle(out, verify=True).mu == 0.3 and siblings(out) == ["b"]


def test_force_never_replaces_something_else(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("precious")
    with pytest.raises(BundleError, match="docs: exists and is not an epicode bundle"):
        BundleWriter(tmp_path / "docs", force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="file: exists and is not a folder"):
        BundleWriter(tmp_path / "file", force=True)
    (tmp_path / "empty").mkdir()
    write_bundle(tmp_path / "empty", force=True)  # an empty folder may be used
    assert open_bundle(tmp_path / "empty").mu == 0.3


def test_unwritable_output(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="b: cannot be written \\(.*file is not a folder\\)"):
        BundleWriter(tmp_path / "file" / "b")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux")
def test_unwritable_output_even_for_root():
    with pytest.raises(BundleError, match="cannot be written"):
        with BundleWriter("/proc/epicode-bundle"):
            pass


def test_open_bundle_errors(tmp_path):
    with pytest.raises(BundleError, match="nothing: no such bundle folder"):
        open_bundle(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(BundleError, match="epicode.json: missing \\(not an epicode bundle\\)"):
        open_bundle(tmp_path / "plain")
    out = write_bundle(tmp_path / "b")
    manifest = json.loads((out / MANIFEST).read_text())

    def rewrite(**changes):
        (out / MANIFEST).write_text(json.dumps(dict(manifest, **changes)))

    (out / MANIFEST).write_text("{oops")
    with pytest.raises(BundleError, match="epicode.json: unreadable manifest"):
        open_bundle(out)
    rewrite(format_version=FORMAT_VERSION + 1)
    with pytest.raises(BundleError, match="is newer than this tool reads"):
        open_bundle(out)
    rewrite(defaults={"lambda": 0.5})
    with pytest.raises(BundleError, match="field 'defaults.alpha' missing"):
        open_bundle(out)
    rewrite(mu="big")
    with pytest.raises(BundleError, match="field 'mu' missing or malformed"):
        open_bundle(out)
    rewrite()
    open_bundle(out)


def test_missing_truncated_or_changed_files(tmp_path):
    out = write_bundle(tmp_path / "b", mlx=True)
    f = out / "gguf/amateur-Q8_0.gguf"
    data = f.read_bytes()
    f.write_bytes(data[:-1])
    with pytest.raises(BundleError, match="amateur-Q8_0.gguf: size 699 != 700 listed in epicode.json"):
        open_bundle(out)
    f.write_bytes(data[:-1] + b"!")
    open_bundle(out)  # same size: only verify reads the content
    with pytest.raises(BundleError, match="amateur-Q8_0.gguf: sha256 differs from epicode.json"):
        open_bundle(out, verify=True)
    (out / "mlx/expert/config.json").unlink()
    with pytest.raises(BundleError, match="config.json: missing \\(listed in epicode.json for mlx expert\\)"):
        open_bundle(out)


def test_info_cli(tmp_path):
    out = write_bundle(tmp_path / "b")
    r = CliRunner().invoke(main, ["info", str(out), "--verify"])
    assert r.exit_code == 0, r.output
    assert "mu = 0.3" in r.output and "gguf       Q8_0    expert 600 B, amateur 700 B" in r.output
    r = CliRunner().invoke(main, ["info", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "Error: " in r.output and "no such bundle folder" in r.output


def test_describe_shows_other_file_groups_and_warnings(tmp_path):
    out = write_bundle(tmp_path / "b")
    manifest = json.loads((out / MANIFEST).read_text())
    (out / "lora").mkdir()
    (out / "lora/finetuned.gguf").write_bytes(b"a" * 1500)
    manifest["files"]["lora"] = {"finetuned": file_entry(out, "lora/finetuned.gguf")}
    manifest["warnings"] = ["mu = 3.0 is large"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    text = "\n".join(describe(open_bundle(out)))
    assert "lora       finetuned lora/finetuned.gguf 1.5 KB" in text and "warning    mu = 3.0 is large" in text


def test_copy_bundle_changes_the_manifest_atomically(tmp_path):
    """tune writes its bundle this way: a copy with new decoding defaults, through the bundle writer."""
    from epicode_edge.converters.bundle import copy_bundle

    src = write_bundle(tmp_path / "src", mlx=True)
    before = (src / MANIFEST).read_text()
    b = copy_bundle(src, tmp_path / "tuned", defaults={"lambda": 2.0, "alpha": 0.1}, tune={"dev_items": 3})
    assert (b.lam, b.mu) == (2.0, 0.3) and b.manifest["tune"] == {"dev_items": 3}
    open_bundle(b.path, verify=True)  # every file copied whole
    assert (src / MANIFEST).read_text() == before  # the source is untouched
    with pytest.raises(BundleError, match="already exists"):
        copy_bundle(src, b.path, defaults={"lambda": 1.0, "alpha": 0.1})
    assert open_bundle(b.path).lam == 2.0 and siblings(b.path) == ["src", "tuned"]  # no temp folder left
    assert copy_bundle(src, b.path, force=True, defaults={"lambda": 1.0, "alpha": 0.1}).lam == 1.0
    with pytest.raises(BundleError, match="defaults"):  # an invalid change is refused by the load check
        copy_bundle(src, tmp_path / "bad", defaults={"lambda": "high"})
    assert siblings(b.path) == ["src", "tuned"]  # and nothing is left under its name
