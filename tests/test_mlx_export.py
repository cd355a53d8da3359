"""HF -> MLX export (streamed, the same folder as mlx_lm.convert: tests/test_mlx_stream.py): the folder loads
in mlx_lm and matches the HF checkpoint's logits.

Measured on the tiny factory models (max |logit| about 13; hidden 64 = one quantization group per row):
unquantized: identical; 8-bit: max abs diff ~0.34, correlation 0.9996+, same argmax; 4-bit: max abs diff
~4.3, correlation 0.93-0.97.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from epicode_edge.converters.mlx import export_mlx
from epicode_edge.errors import InputError, ParameterError
from factory import make_hf_model
from gguf_helpers import PROMPTS, mlx_last_logits


@pytest.fixture(scope="session")
def hf_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlx_export")
    return root, {"llama": make_hf_model(root / "llama", arch="llama"),
                  "qwen3_bf16": make_hf_model(root / "qwen3_bf16", arch="qwen3", dtype="bfloat16", tie=True)}


def _logits(path):
    import mlx_lm

    model, tok = mlx_lm.load(str(path))
    return [mlx_last_logits(model, tok.encode(t)) for t in PROMPTS]


def _quantized_logits(path, bits, group_size=64):
    """The HF checkpoint loaded by mlx_lm in float32, quantized in memory by mlx_lm.utils.quantize_model."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.utils import quantize_model

    model, tok = mlx_lm.load(str(path))
    model.set_dtype(mx.float32)
    quantize_model(model, {}, group_size, bits)
    return [mlx_last_logits(model, tok.encode(t)) for t in PROMPTS]


@pytest.mark.parametrize("key,bits,tol,min_corr", [("llama", None, 0.0, 1.0), ("qwen3_bf16", None, 0.0, 1.0),
                                                   ("llama", 8, 1.0, 0.999), ("llama", 4, 8.0, 0.85)])
def test_export_loads_and_matches(key, bits, tol, min_corr, hf_pair):
    root, hf = hf_pair
    out = export_mlx(hf[key], root / f"{key}-mlx-{bits}", bits=bits)
    assert not out.with_name(out.name + ".part").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert ("quantization" in cfg) == (bits is not None)
    if bits:
        assert cfg["quantization"]["bits"] == bits and cfg["quantization"]["group_size"] == 64
    ref, got = _logits(hf[key]), _logits(out)
    for r, g in zip(ref, got):
        assert np.abs(r - g).max() <= tol
        assert np.corrcoef(r, g)[0, 1] >= min_corr - 1e-6
        if bits is None or bits == 8:
            assert r.argmax() == g.argmax()
    if bits:  # the quantized folder computes what mlx_lm's own quantization of the float32 HF model computes
        for r, g in zip(_quantized_logits(hf[key], bits), got):
            assert np.abs(r - g).max() <= 1e-4
    assert (out / "tokenizer.json").is_file()


def test_export_bad_input(hf_pair, tmp_path):
    root, hf = hf_pair
    with pytest.raises(ParameterError, match="mlx bits 7"):
        export_mlx(hf["llama"], tmp_path / "a", bits=7)
    with pytest.raises(ParameterError, match="group_size 48"):
        export_mlx(hf["llama"], tmp_path / "a", bits=4, group_size=48)
    with pytest.raises(InputError, match="no config.json"):
        export_mlx(tmp_path, tmp_path / "a")
    (tmp_path / "exists").mkdir()
    with pytest.raises(InputError, match="already exists"):
        export_mlx(hf["llama"], tmp_path / "exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]
