"""Hugging Face Hub ids as model inputs (org/name, org/name@revision, org/name/file.gguf), from a Hub cache
built here in the layout huggingface_hub reads (models--org--name/refs, snapshots/<commit>/), offline
(HF_HUB_OFFLINE=1) and with every socket connection refused."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, cli
from epicode_edge.converters import hub
from factory import make_lora_pair, make_pair

SHA = {"ft": "a" * 40, "ft-v1": "b" * 40, "inf": "c" * 40, "gguf": "d" * 40, "base": "e" * 40}


def _put(cache: Path, repo: str, sha: str, src: Path, ref: str = "main") -> Path:
    """src (a folder's files, or one file) as snapshot `sha` of `repo`, with refs/<ref> pointing at it."""
    d = cache / f"models--{repo.replace('/', '--')}"
    snap = d / "snapshots" / sha
    if src.is_dir():
        shutil.copytree(src, snap, dirs_exist_ok=True)
    else:
        snap.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, snap / src.name)
    (d / "refs").mkdir(parents=True, exist_ok=True)
    (d / "refs" / ref).write_text(sha)
    return snap


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A Hub cache: org/tiny-ft (main, and tag v1 = another commit), org/tiny-inf, org/tiny-gguf (two .gguf files),
    org/tiny-base with two PEFT adapters beside it (local folders)."""
    from epicode_edge.converters.checkpoint import open_checkpoint
    from epicode_edge.converters.gguf import gguf_sink_for

    root = tmp_path_factory.mktemp("hub")
    ft, inf = make_pair(root / "models", seed=1)
    cache = root / "cache"
    _put(cache, "org/tiny-ft", SHA["ft"], ft)
    _put(cache, "org/tiny-ft", SHA["ft-v1"], inf, ref="v1")
    _put(cache, "org/tiny-inf", SHA["inf"], inf)
    for name, src in (("tiny-ft.F32.gguf", ft), ("tiny-inf.F32.gguf", inf)):
        with open_checkpoint(src) as ckpt, gguf_sink_for(ckpt, root / name, "F32") as sink:
            for t in ckpt.tensors:
                sink.write(t, ckpt.read_f32(t))
        _put(cache, "org/tiny-gguf", SHA["gguf"], root / name)
    _put(cache, "org/tiny-base", SHA["base"], ft)
    ad_ft, ad_inf = make_lora_pair(root / "adapters", ft, rank=2, seed=4)
    return {"cache": cache, "root": root, "ft": ft, "inf": inf, "adapters": (ad_ft, ad_inf)}


@pytest.fixture(autouse=True)
def offline(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(cache["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*a, **kw):
        raise AssertionError("a test reached for the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_resolve_forms(cache, tmp_path, monkeypatch):
    snap = cache["cache"] / "models--org--tiny-ft" / "snapshots"
    assert hub.resolve("org/tiny-ft") == snap / SHA["ft"]
    assert hub.resolve("org/tiny-ft@v1") == snap / SHA["ft-v1"]
    assert hub.resolve(f"org/tiny-ft@{SHA['ft-v1']}") == snap / SHA["ft-v1"]
    f = hub.resolve("org/tiny-gguf/tiny-inf.F32.gguf")
    assert f.name == "tiny-inf.F32.gguf" and f.is_file()
    assert hub.origin(f) == {"repo_id": "org/tiny-gguf", "revision": SHA["gguf"], "file": "tiny-inf.F32.gguf"}
    # a local path that exists wins over the Hub id it also spells
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "tiny-ft").mkdir(parents=True)
    assert hub.resolve("org/tiny-ft") == Path("org/tiny-ft")
    # neither a path nor a Hub id: unchanged, for the reader's "no such file" line
    assert hub.resolve("./nope") == Path("./nope") and hub.resolve("a/b/c/d") == Path("a/b/c/d")


def test_convert_from_hub_ids_records_repo_and_commit(cache, tmp_path):
    code, out = cli("convert", "--finetuned", "org/tiny-ft", "--inferior", "org/tiny-inf", "--mu", 0.5, "--to", "hf",
                    "-o", tmp_path / "b")
    assert code == 0, out
    src = json.loads((tmp_path / "b" / "epicode.json").read_text())["sources"]
    assert (src["finetuned"]["repo_id"], src["finetuned"]["revision"]) == ("org/tiny-ft", SHA["ft"])
    assert (src["inferior"]["repo_id"], src["inferior"]["revision"]) == ("org/tiny-inf", SHA["inf"])
    code, out = cli("info", tmp_path / "b")
    assert f"org/tiny-ft@{SHA['ft'][:12]}" in out
    # the same models as local folders give the same expert
    code, out = cli("convert", "--finetuned", cache["ft"], "--inferior", cache["inf"], "--mu", 0.5, "--to", "hf",
                    "-o", tmp_path / "local")
    assert code == 0, out
    a = (tmp_path / "b" / "hf/expert/model.safetensors").read_bytes()
    assert a == (tmp_path / "local" / "hf/expert/model.safetensors").read_bytes()


def test_revision_and_gguf_file_in_a_repo(cache, tmp_path):
    code, out = cli("convert", "--finetuned", "org/tiny-gguf/tiny-ft.F32.gguf", "--inferior",
                    f"org/tiny-gguf@{SHA['gguf']}/tiny-inf.F32.gguf", "--mu", 0.25, "--to", "gguf", "--quant", "F32",
                    "-o", tmp_path / "b")
    assert code == 0, out
    src = json.loads((tmp_path / "b" / "epicode.json").read_text())["sources"]
    assert src["finetuned"]["repo_id"] == "org/tiny-gguf" and src["finetuned"]["file"] == "tiny-ft.F32.gguf"
    assert src["inferior"]["file"] == "tiny-inf.F32.gguf" and src["inferior"]["revision"] == SHA["gguf"]
    # a tag: org/tiny-ft@v1 is another commit of the repo (here the inferior's weights)
    code, out = cli("convert", "--finetuned", "org/tiny-ft", "--inferior", "org/tiny-ft@v1", "--mu", 0.25, "--to", "hf",
                    "-o", tmp_path / "c")
    assert code == 0, out
    src = json.loads((tmp_path / "c" / "epicode.json").read_text())["sources"]
    assert src["inferior"]["revision"] == SHA["ft-v1"] and src["finetuned"]["revision"] == SHA["ft"]
    assert src["inferior"]["content_sha256"] != src["finetuned"]["content_sha256"]


def test_hub_base_of_lora_adapters(cache, tmp_path):
    ad_ft, ad_inf = cache["adapters"]
    code, out = cli("convert", "--base", "org/tiny-base", "--finetuned", ad_ft, "--inferior", ad_inf, "--mu", 0.5,
                    "--quant", "F32", "-o", tmp_path / "b")
    assert code == 0, out
    src = json.loads((tmp_path / "b" / "epicode.json").read_text())["sources"]
    assert (src["base"]["repo_id"], src["base"]["revision"]) == ("org/tiny-base", SHA["base"])


@pytest.mark.parametrize("spec, expect", [
    ("org/missing", ["org/missing", "not in the Hub cache", "run once online", "huggingface-cli download org/missing"]),
    ("org/tiny-ft@v9", ["org/tiny-ft", "v9", "--revision v9"]),
    ("org/tiny-gguf/absent.gguf", ["absent.gguf", "huggingface-cli download org/tiny-gguf absent.gguf"]),
    ("./not-here", ["not-here: no such file or directory"]),
    ("org/tiny-gguf", ["no config.json", "org/tiny-gguf/FILE.gguf"]),
])
def test_missing_offline_one_line(cache, tmp_path, spec, expect):
    code, out = cli("convert", "--finetuned", spec, "--inferior", "org/tiny-inf", "--mu", 0.5, "-o", tmp_path / "b")
    assert_one_line_error(code, out, *expect)
    assert not (tmp_path / "b").exists()


def test_library_reads_the_cache_only(cache, monkeypatch):
    """Without the CLI's allow_downloads() the library never goes to the network, even online: a cached repo
    works, a missing one is one line."""
    from epicode_edge.errors import InputError

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "_downloads", False)
    assert hub.resolve("org/tiny-inf").name == SHA["inf"]
    with pytest.raises(InputError, match=r"org/missing.*not in the Hub cache \(downloads are off\).*huggingface-cli"):
        hub.resolve("org/missing")


def test_run_of_adapters_naming_a_cached_hub_base(cache, tmp_path):
    """PEFT checkpoints whose adapter_config.json names a Hub id: the cached snapshot is their base."""
    from factory import make_lora_adapter

    prev = None
    for step in (50, 100):
        d = tmp_path / "out" / f"checkpoint-{step}"
        prev = make_lora_adapter(d, cache["ft"], rank=2, seed=step, like=prev)
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "org/tiny-base"}))
    code, out = cli("convert", "--run", tmp_path / "out", "--mu", 0.5, "--quant", "F32", "-o", tmp_path / "b")
    assert code == 0, out
    src = json.loads((tmp_path / "b" / "epicode.json").read_text())["sources"]
    assert (src["base"]["repo_id"], src["base"]["revision"]) == ("org/tiny-base", SHA["base"])
    assert Path(src["inferior"]["path"]).name == "checkpoint-50"
