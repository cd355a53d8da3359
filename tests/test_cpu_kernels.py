"""llama.cpp's CPU kernels: the setting, the probe and its cache, and both kernel paths through every way we
load a model (single, multi-sequence, shared-base LoRA) on Q8_0, Q4_0 and Q4_K_M.

The AMX crash itself needs a CPU that reports AMX with broken hypervisor support; here a probe child that
dies by SIGILL stands in for it, and the real probe and both real kernel paths run on whatever CPU runs the suite.
"""

from __future__ import annotations

import json
import platform
import signal
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from epicode_edge.backends import cpu_kernels as ck
from epicode_edge.errors import ParameterError

QUANTS = ("Q8_0", "Q4_0", "Q4_K_M")
N_THREADS = 1


@pytest.fixture(autouse=True)
def _clean_setting(monkeypatch):
    monkeypatch.delenv(ck.ENV, raising=False)
    ck.set_mode(None)
    yield
    ck.set_mode(None)


# -- the setting ---------------------------------------------------------------------------------------


def test_mode_comes_from_api_then_environment_then_default(monkeypatch):
    assert ck.current_mode() == ("auto", "default")
    monkeypatch.setenv(ck.ENV, "OFF")
    assert ck.current_mode() == ("off", "environment")
    ck.set_mode("on")
    assert ck.current_mode() == ("on", "set_mode")
    ck.set_mode(None)
    assert ck.current_mode() == ("off", "environment")


def test_bad_mode_is_a_one_line_error_naming_the_variable(monkeypatch):
    with pytest.raises(ParameterError, match="cpu repack mode must be one of auto, on, off"):
        ck.set_mode("fast")
    monkeypatch.setenv(ck.ENV, "maybe")
    with pytest.raises(ParameterError, match=r"\$EPICODE_EDGE_CPU_REPACK must be one of auto, on, off, got 'maybe'"):
        ck.current_mode()


def test_forced_modes_decide_without_probing(monkeypatch, tmp_path):
    monkeypatch.setenv("EPICODE_EDGE_CACHE", str(tmp_path))  # an empty cache: a probe would write here
    ck.set_mode("off")
    d = ck.decide()
    assert (d.use_extra_bufts, d.mode, d.source) == (False, "off", "set_mode") and "forced off" in d.reason
    monkeypatch.setenv(ck.ENV, "on")
    ck.set_mode(None)
    d = ck.decide()
    assert (d.use_extra_bufts, d.source) == (True, "environment") and "forced on" in d.reason
    assert not (tmp_path / ck.CACHE_FILE).exists()


def test_cli_option_and_env(monkeypatch):
    from epicode_edge.cli import main

    r = CliRunner().invoke(main, ["--cpu-repack", "sometimes", "doctor"])
    assert r.exit_code == 2 and "--cpu-repack" in r.output
    monkeypatch.setenv(ck.ENV, "off")
    r = CliRunner().invoke(main, ["-v", "doctor"])
    assert r.exit_code == 0, r.output
    assert "plain CPU kernels" in r.output and f"forced off (set by ${ck.ENV})" in r.output
    r = CliRunner().invoke(main, ["--cpu-repack", "on", "doctor", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)["llama.cpp"]
    assert info["use_extra_bufts"] is True and info["mode_source"] == "option"
    assert "set by --cpu-repack" in info["reason"]


# -- the probe -------------------------------------------------------------------------------------------


def test_real_probe_runs_once_then_comes_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EPICODE_EDGE_CACHE", str(tmp_path))
    first = ck.cached_probe()
    assert not first.cached and first.key
    if first.ok:
        assert first.passed == list(QUANTS) and first.returncode == 0
    else:  # this CPU's extra kernels fail: the probe says where and how, and the process survived it
        assert first.failed_stage and first.detail.startswith("llama.cpp in stage")
    again = ck.cached_probe()
    assert again.cached and (again.ok, again.key, again.detail) == (first.ok, first.key, first.detail)
    d = ck._decide("auto", "default", refresh=False)
    assert d.use_extra_bufts == first.ok and d.probe.cached


def test_a_probe_child_killed_by_sigill_is_a_verdict_not_a_crash():
    child = ("import os, signal; print('stage Q8_0 extra buffer types', flush=True); "
             "os.kill(os.getpid(), signal.SIGILL)")
    r = ck.probe([sys.executable, "-c", child])
    assert not r.ok and r.returncode == -signal.SIGILL
    assert r.failed_stage == "Q8_0 extra buffer types"
    assert "SIGILL" in r.detail and "stage 'Q8_0 extra buffer types'" in r.detail


def test_a_hung_or_failing_probe_child_is_a_failed_probe():
    r = ck.probe([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert not r.ok and r.returncode is None and "timed out" in r.detail
    r = ck.probe([sys.executable, "-c", "import sys; sys.exit('no llama here')"])
    assert not r.ok and r.returncode == 1 and "no llama here" in r.detail


def test_only_verdicts_about_the_kernels_are_cached(monkeypatch, tmp_path):
    """A child that could not run (an import error: exit 1) is no verdict on the kernels: plain kernels for now,
    nothing cached, probed again next time. A child killed by a signal is a verdict, and is cached."""
    monkeypatch.setenv("EPICODE_EDGE_CACHE", str(tmp_path))
    r = ck.cached_probe(argv=[sys.executable, "-c", "import no_such_module_here"])
    assert not r.ok and not r.about_kernels and not (tmp_path / ck.CACHE_FILE).exists()
    killed = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]
    r = ck.cached_probe(argv=killed)
    assert not r.ok and r.about_kernels
    again = ck.cached_probe(argv=[sys.executable, "-c", "pass"])  # would pass, but the verdict is cached
    assert again.cached and not again.ok and again.returncode == -signal.SIGILL


def test_failed_probe_in_cache_means_plain_kernels(monkeypatch, tmp_path):
    """The auto decision where the probe died: plain kernels, and the reason says what died and what forces them."""
    monkeypatch.setenv("EPICODE_EDGE_CACHE", str(tmp_path))
    key = ck.build_key()
    record = dict(ok=False, detail="llama.cpp in stage 'Q8_0 extra buffer types' killed by SIGILL (Illegal "
                                   "instruction)", passed=[], failed_stage="Q8_0 extra buffer types",
                  returncode=-4, seconds=0.4, key=key)
    (tmp_path / ck.CACHE_FILE).write_text(json.dumps({key: record}))
    d = ck._decide("auto", "default", refresh=False)
    assert d.use_extra_bufts is False
    assert "SIGILL" in d.reason and f"{ck.ENV}=on" in d.reason and d.probe.cached


def test_unreadable_cache_is_probed_again(monkeypatch, tmp_path):
    monkeypatch.setenv("EPICODE_EDGE_CACHE", str(tmp_path))
    (tmp_path / ck.CACHE_FILE).write_text("{not json")
    r = ck.cached_probe()
    assert not r.cached
    assert r.key in json.loads((tmp_path / ck.CACHE_FILE).read_text())


# -- both kernel paths, every way we load a model --------------------------------------------------------


@pytest.fixture(scope="module")
def quant_family(tmp_path_factory):
    """A tiny Llama whose matrices the AMX/repack/K-quant kernels take (rows and columns multiples of 32 and
    256), its LoRA pair, and a shared-base bundle at Q8_0, Q4_0 and Q4_K_M."""
    from factory import make_hf_model, make_lora_pair

    from epicode_edge.converters.lora import convert_lora

    root = tmp_path_factory.mktemp("quant_family")
    base = make_hf_model(root / "base", hidden=256, intermediate=512, heads=4, kv_heads=2, layers=1, seed=3)
    ft, inf = make_lora_pair(root / "adapters", base, rank=4, seed=5)
    bundle = convert_lora(base, ft, inf, root / "bundle", mu=0.5, quant=",".join(QUANTS))
    return bundle


def _run_all_paths(bundle, quant):
    """(single, multi-sequence, LoRA expert) logits of one prefill and one step, and the single backend's facts."""
    from epicode_edge.backends.llamacpp import LlamaCppBackend
    from epicode_edge.backends.llamacpp_lora import open_roles
    from epicode_edge.backends.multiseq import open_multiseq
    from epicode_edge.converters.lora import shared_base_roles

    base = bundle.gguf("base", quant)
    b = LlamaCppBackend(base, n_ctx=64, n_threads=N_THREADS)
    try:
        prompt = b.tokenize("12 + 34 = 46. 5 * 6 = 30.")
        single = [b.prefill(prompt).copy(), b.step(prompt[1]).copy()]
        with open_multiseq(b, n_slots=2) as ms:
            got = ms.decode([(0, prompt), (1, prompt[:5])])
            multi = [got[0], ms.decode([(0, [prompt[1]])])[0]]
        facts = (bool(b._llm.model_params.use_extra_bufts), b.weight_buffers, b.cpu_kernels)
    finally:
        b.close()
    roles = open_roles(*shared_base_roles(bundle, quant), ("expert", "amateur"), n_ctx=64, n_threads=N_THREADS)
    try:
        e = roles["expert"]
        lora = [e.prefill(prompt).copy(), e.step(prompt[1]).copy()]
        assert e.cpu_kernels == facts[2]
    finally:
        for r in roles.values():
            r.close()
    return single, multi, lora, facts


@pytest.mark.parametrize("quant", QUANTS)
def test_prefill_and_decode_on_both_kernel_paths(quant_family, quant):
    auto = ck.decide()
    out = {}
    for mode in ("off", "on"):
        if mode == "on" and not auto.use_extra_bufts and auto.mode == "auto":
            continue  # "on" only where the probe shows the extra kernels run here: elsewhere they kill the process
        ck.set_mode(mode)
        single, multi, lora, (used, buffers, decision) = _run_all_paths(quant_family, quant)
        assert used is (mode == "on") and decision.use_extra_bufts is (mode == "on")
        for x in single + multi + lora:
            assert x.shape == single[0].shape and np.isfinite(x).all()
        np.testing.assert_array_equal(multi[0], single[0])  # same engine, same kernels, same chunking
        assert not np.allclose(lora[0], single[0], atol=1e-3)  # the adapters are applied
        if mode == "off":
            assert not {"CPU_REPACK", "AMX"} & set(buffers), buffers
        out[mode] = single
    if "on" in out:
        for a, b in zip(out["on"], out["off"]):  # other kernels, same model: only rounding differs
            assert np.max(np.abs(a - b)) <= 0.05 * np.max(np.abs(b)), quant


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 repack kernels")
def test_on_x86_the_setting_reaches_the_engine(quant_family):
    """Q4_0 weights go to llama.cpp's repacked (or AMX) buffers with the extra buffer types, and stay in plain
    buffers without them: the setting is not just recorded, the engine follows it."""
    from epicode_edge.backends.llamacpp import LlamaCppBackend

    auto = ck.decide()
    if not auto.use_extra_bufts:
        pytest.skip(f"extra buffer types are off on this machine ({auto.reason})")
    import llama_cpp

    if "REPACK = 1" not in llama_cpp.llama_print_system_info().decode() and "AMX" not in \
            llama_cpp.llama_print_system_info().decode():
        pytest.skip("this llama.cpp build has neither repack nor AMX kernels")
    seen = {}
    for mode in ("on", "off"):
        ck.set_mode(mode)
        b = LlamaCppBackend(quant_family.gguf("base", "Q4_0"), n_ctx=64, n_threads=N_THREADS)
        seen[mode] = set(b.weight_buffers)
        b.close()
    assert {"CPU_REPACK", "AMX"} & seen["on"], seen
    assert not {"CPU_REPACK", "AMX"} & seen["off"], seen


# -- the test suite's own guard -----------------------------------------------------------------------------


def test_engine_crash_in_the_smoke_check_stops_pytest_with_one_line(tmp_path):
    """A session whose smoke check child dies by SIGILL ends at once, exit 3, with the failure and the setting
    that avoids it, and a summary: not a dead pytest."""
    import os
    import subprocess
    from pathlib import Path

    tests = Path(__file__).parent
    (tmp_path / "conftest.py").write_text(f"""
import sys
sys.path.insert(0, {str(tests)!r})
from engine_guard import guard
from epicode_edge.backends import cpu_kernels

CHILD = "import os, signal; print('stage Q8_0 prefill and step', flush=True); os.kill(os.getpid(), signal.SIGILL)"

def pytest_sessionstart(session):
    guard(lambda: cpu_kernels.run_child([sys.executable, "-c", CHILD], 60, {{}}))
""")
    (tmp_path / "test_one.py").write_text("def test_one():\n    assert True\n")
    env = {k: v for k, v in os.environ.items() if k != ck.ENV}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 3, out
    assert "llama.cpp engine smoke check failed" in out and "SIGILL" in out and "stage 'Q8_0 prefill and step'" in out
    assert f"{ck.ENV}=off" in out and "Traceback" not in out and "1 passed" not in out
