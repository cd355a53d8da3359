"""Engine options a user sets at load: the amateur at another quant, the KV cache type, and the environment
variables the commands read them from."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from epicode_edge.cli import main
from epicode_edge.errors import ParameterError
from epicode_edge.runtime import load
from rt_models import N_THREADS, bundle  # noqa: F401  (fixture)


def test_amateur_at_another_quant(bundle):  # noqa: F811
    with load(bundle, quant="F32", n_threads=N_THREADS) as same, \
            load(bundle, quant="F32", amateur_quant="Q8_0", n_threads=N_THREADS) as mixed:
        assert mixed.expert.path.name == "expert-F32.gguf" and mixed.amateur.path.name == "amateur-Q8_0.gguf"
        assert mixed.quant == "F32/Q8_0" and same.quant == "F32"
        prompt = "Question: what is 17 + 25? Answer:"
        # the expert alone is untouched; with the amateur in use the answers may differ only by its rounding
        assert mixed.generate(prompt, raw=True, lam=0.0, max_tokens=16).tokens == \
            same.generate(prompt, raw=True, lam=0.0, max_tokens=16).tokens
        ids = same.encode(prompt, raw=True)
        y_same = same.amateur.prefill(ids).copy()
        y_mixed = mixed.amateur.prefill(ids).copy()
        assert 0 < np.abs(y_same - y_mixed).max() < 0.1 * np.abs(y_same).max()
        assert mixed.generate(prompt, raw=True, lam=1.0, max_tokens=16).completion_tokens > 0


def test_amateur_quant_refusals(bundle):  # noqa: F811
    from epicode_edge.errors import BundleError

    with pytest.raises(BundleError, match="no GGUF files for quant Q4_K_M"):
        load(bundle, quant="F32", amateur_quant="Q4_K_M")
    with pytest.raises(ParameterError, match="applies to the llama.cpp backend only"):
        load(bundle, backend="mlx", amateur_quant="Q8_0")


def test_kv_cache_types(bundle, tmp_path):  # noqa: F811
    from factory import make_hf_model

    from epicode_edge.converters.gguf import hf_to_gguf
    from epicode_edge.errors import BackendError
    from epicode_edge.runtime import load_models

    # head size 64: a q8_0 cache takes heads divisible by its block of 32
    g = hf_to_gguf(make_hf_model(tmp_path / "m", hidden=128, heads=2, kv_heads=1, seed=4), tmp_path / "m.gguf",
                   quant="F32")
    ids, logits = None, {}
    for kv in ("f32", "f16", "q8_0"):
        with load_models(g, g, n_threads=N_THREADS, kv_type=kv) as rt:
            ids = ids or rt.encode("The quick brown fox jumps over the lazy dog", raw=True)
            logits[kv] = rt.expert.prefill(ids).copy()
    scale = np.abs(logits["f32"]).max()
    assert 0 < np.abs(logits["f16"] - logits["f32"]).max() < 0.05 * scale
    assert 0 < np.abs(logits["q8_0"] - logits["f32"]).max() < 0.1 * scale
    # each cache type is the one asked for: the same logits as llama-cpp-python opened directly with that
    # type_k/type_v (and flash attention, which a quantized V cache needs), and other logits than the others'
    import llama_cpp

    from epicode_edge.backends.cpu_kernels import open_llama

    ref = {}
    for kv, (ggml_type, fa) in {"f32": (llama_cpp.GGML_TYPE_F32, False), "f16": (llama_cpp.GGML_TYPE_F16, False),
                                "q8_0": (llama_cpp.GGML_TYPE_Q8_0, True)}.items():
        llm = open_llama(str(g), n_ctx=2048, n_batch=512, n_threads=N_THREADS, n_threads_batch=N_THREADS,
                         logits_all=False, verbose=False, type_k=ggml_type, type_v=ggml_type, flash_attn=fa)
        try:
            llm.eval(ids)
            ref[kv] = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                            shape=(llm.n_vocab(),)).copy()  # (V,)
        finally:
            llm.close()
    for kv in ref:
        assert np.abs(logits[kv] - ref[kv]).max() < 1e-4, kv
    assert np.abs(ref["q8_0"] - ref["f16"]).max() > 1e-3  # the comparison tells the types apart
    with pytest.raises(BackendError, match="q8_0 KV cache needs attention head sizes divisible by 32"):
        load(bundle, kv_type="q8_0")  # the shared test bundle's heads are 16 wide
    with pytest.raises(ParameterError, match="kv_type must be one of f32, f16, q8_0"):
        load(bundle, kv_type="q4_0")
    with pytest.raises(ParameterError, match="applies to llama.cpp only"):
        load(bundle, backend="mlx", kv_type="f32")
    with pytest.raises(ParameterError, match="--batch-steps applies to llama.cpp only"):
        load(bundle, backend="mlx", batch_steps="split")


def test_cli_engine_options_and_their_environment_variables(bundle):  # noqa: F811
    r = CliRunner().invoke(main, ["generate", str(bundle), "2+2=", "--raw", "--json", "--max-tokens", "3",
                                  "--quant", "F32", "--amateur-quant", "Q8_0", "--cache-type", "f32"],
                           env={"EPICODE_EDGE_THREADS": "1"})
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.splitlines()[-1])["completion_tokens"] == 3
    r = CliRunner().invoke(main, ["generate", str(bundle), "2+2=", "--raw"], env={"EPICODE_EDGE_CACHE_TYPE": "f8"})
    assert r.exit_code == 2 and "--cache-type" in r.output
    r = CliRunner().invoke(main, ["generate", str(bundle), "2+2=", "--raw", "--max-tokens", "2"],
                           env={"EPICODE_EDGE_THREADS": "0"})
    assert r.exit_code == 1 and "n_threads must be an integer >= 1, got 0" in r.output
    help_text = CliRunner().invoke(main, ["generate", "--help"]).output
    for var in ("EPICODE_EDGE_THREADS", "EPICODE_EDGE_N_CTX", "EPICODE_EDGE_CACHE_TYPE", "EPICODE_EDGE_BACKEND"):
        assert var in help_text
