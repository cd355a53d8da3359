"""GGUF -> GGUF for architectures beyond Llama/Qwen (gemma2, gemma3, phi3: tiny files in llama.cpp's converter
layout, tests/arch_gguf.py): the expert is the per-tensor sum at every GGUF quant the tool writes, loads in
llama.cpp and gives finite logits; mu = 0 gives the finetuned model's bytes; what must match is checked."""

import warnings

import numpy as np
import pytest
from arch_gguf import ARCHS, make_arch_gguf_pair
from cli_helpers import assert_one_line_error, cli
from gguf_helpers import llama_last_logits, llama_model

from epicode_edge.converters.checkpoint import open_checkpoint
from epicode_edge.converters.convert import convert
from epicode_edge.runtime import check_gguf_runs

MU = 0.5
QUANTS = ("F16", "Q8_0", "Q4_K_M")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("any-arch")
    return {arch: make_arch_gguf_pair(root / arch, arch) for arch in ARCHS}


def _convert(ft, inf, out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(ft, inf, out, check_model=check_gguf_runs, **kw)


def _tensors(path) -> dict:
    """name -> (ggml type, float32 values, stored bytes) of every tensor of a GGUF file."""
    with open_checkpoint(path) as c:
        return {n: (t.dtype, c.read_f32(n).copy(), np.asarray(c.read(n)).tobytes()) for n, t in c.tensors.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_is_the_extrapolation_at_every_quant(pairs, tmp_path, arch):
    ft, inf = pairs[arch]
    b = _convert(ft, inf, tmp_path / "b", mu=MU, quant=",".join(QUANTS))
    with open_checkpoint(ft) as f, open_checkpoint(inf) as i:
        want = {}
        for n in f.tensors:
            a, c = f.read_f32(n), i.read_f32(n)
            want[n] = a + np.float32(MU) * (a - c)  # (shape) float32, as converters/extrapolate.py computes
        ft_values = {n: f.read_f32(n).copy() for n in f.tensors}
    assert b.arch == arch
    for q in QUANTS:
        expert, amateur = _tensors(b.gguf("expert", q)), _tensors(b.gguf("amateur", q))
        assert expert.keys() == want.keys()
        for n, (qtype, x, _) in expert.items():
            assert qtype == amateur[n][0], (q, n)  # the expert follows the amateur's per-tensor types
            if qtype == "F32":
                np.testing.assert_array_equal(x, want[n])
            elif qtype == "F16":
                np.testing.assert_array_equal(x, want[n].astype(np.float16).astype(np.float32))
            elif qtype == "Q8_0":  # each value within half a step of its block (amax / 127, stored as f16:
                blocks = want[n].reshape(-1, 32)  # its rounding moves a value by up to 127 * 2^-11 steps)
                step = np.abs(blocks).max(axis=1, keepdims=True) / 127
                assert np.all(np.abs(x.reshape(-1, 32) - blocks) <= (0.5 + 127 * 2.0**-11) * step + 1e-7), n
            else:  # K-quants: the expert's quantization error is the amateur's kind of error
                err_e = np.sqrt(np.mean((x - want[n]) ** 2) / np.mean(want[n] ** 2))
                err_a = np.sqrt(np.mean((amateur[n][1] - ft_values[n]) ** 2) / np.mean(ft_values[n] ** 2))
                assert 0 < err_e < 0.1 and err_e < 2 * err_a + 1e-3, (q, n, qtype, err_e, err_a)
        assert any(t[0] not in ("F32", "F16", "Q8_0") for t in expert.values()) or q != "Q4_K_M"
        llm = llama_model(b.gguf("expert", q))
        try:
            logits = llama_last_logits(llm, [1, 5, 9, 3])
        finally:
            llm.close()
        assert np.all(np.isfinite(logits)) and logits.std() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_mu_zero_gives_the_finetuned_bytes(pairs, tmp_path, arch):
    ft, inf = pairs[arch]
    b = _convert(ft, inf, tmp_path / "b", mu=0, quant="F32,Q8_0,Q4_K_M")
    source = _tensors(ft)
    for q in ("F32", "Q8_0", "Q4_K_M"):
        expert, amateur = _tensors(b.gguf("expert", q)), _tensors(b.gguf("amateur", q))
        for n in source:
            assert expert[n][2] == amateur[n][2], (q, n)
            if q == "F32":
                assert expert[n][2] == source[n][2], n


def _assert_refused(code, output, out, *expect):
    assert_one_line_error(code, output, *expect)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temporary bundle


def test_two_architectures_are_refused(pairs, tmp_path):
    out = tmp_path / "b"
    code, output = cli("convert", "--finetuned", pairs["gemma2"][0], "--inferior", pairs["gemma3"][1], "--mu", MU,
                       "-o", out)
    _assert_refused(code, output, out, "architecture differs", "'gemma2'", "'gemma3'")


def test_different_hyperparameters_are_refused_naming_the_key(tmp_path):
    ft, _ = make_arch_gguf_pair(tmp_path / "a", "gemma2")
    _, inf = make_arch_gguf_pair(tmp_path / "b", "gemma2", meta={"gemma2.attention.sliding_window": 16})
    out = tmp_path / "out"
    code, output = cli("convert", "--finetuned", ft, "--inferior", inf, "--mu", MU, "-o", out)
    _assert_refused(code, output, out, "'gemma2.attention.sliding_window' differs", "8 in finetuned",
                    "16 in inferior")


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_an_architecture_llama_cpp_cannot_load_is_refused_before_writing(tmp_path, quant):
    ft, inf = make_arch_gguf_pair(tmp_path / "in", "llama", arch_name="nosucharch")
    out = tmp_path / "out"
    code, output = cli("convert", "--finetuned", ft, "--inferior", inf, "--mu", MU, "--quant", quant, "-o", out)
    _assert_refused(code, output, out, "finetuned.gguf", "unknown model architecture: 'nosucharch'")


@pytest.mark.parametrize("to", ["hf", "mlx"])
def test_gguf_to_hf_or_mlx_stays_with_the_architectures_it_rebuilds(pairs, tmp_path, to):
    out = tmp_path / "b"
    code, output = cli("convert", "--finetuned", pairs["gemma2"][0], "--inferior", pairs["gemma2"][1], "--mu", MU,
                       "--to", to, "-o", out)
    _assert_refused(code, output, out, "finetuned.gguf", "gemma2")


def test_a_tensor_the_source_keeps_in_f32_stays_f32(tmp_path):
    """An F16 file with one matrix stored F32 (as llama.cpp's converter keeps e.g. Mamba's ssm tensors):
    the bundle keeps it F32 at every directly written quant, the expert's being the exact float32 sum."""
    kept = "blk.1.ffn_down.weight"
    ft, inf = make_arch_gguf_pair(tmp_path / "in", "gemma2", quant="F16", f32=(kept,))
    b = _convert(ft, inf, tmp_path / "b", mu=MU, quant="F16,Q8_0")
    with open_checkpoint(ft) as f, open_checkpoint(inf) as i:
        a, c = f.read_f32(kept), i.read_f32(kept)
    for q in ("F16", "Q8_0"):
        expert, amateur = _tensors(b.gguf("expert", q)), _tensors(b.gguf("amateur", q))
        assert expert[kept][0] == amateur[kept][0] == "F32", q
        np.testing.assert_array_equal(expert[kept][1], a + np.float32(MU) * (a - c))
        assert expert["blk.0.ffn_down.weight"][0] == q  # the others at the quant asked for
