"""converters/gguf_file.py: the fast GGUF header reader against gguf-py's GGUFReader, and native (llama.cpp)
dequantization against gguf-py's numpy dequantizer, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from epicode_edge.converters import gguf_file
from epicode_edge.errors import CheckpointError

QUANTS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K_M", "Q6_K")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A tiny Llama (rows of 256: the K-quants take them) as F32, quantized by llama.cpp to each type."""
    from factory import make_hf_model

    from epicode_edge.converters.gguf import FT, hf_to_gguf, llama_quantize

    root = tmp_path_factory.mktemp("gguf_file")
    f32 = hf_to_gguf(make_hf_model(root / "m", hidden=256, intermediate=512, heads=4, kv_heads=2, layers=1, seed=2),
                     root / "m-F32.gguf", quant="F32")
    out = {"F32": f32}
    for q in QUANTS:
        llama_quantize(f32, root / f"m-{q}.gguf", FT[f"MOSTLY_{q}"])
        out[q] = root / f"m-{q}.gguf"
    return out


@pytest.mark.parametrize("q", ("F32",) + QUANTS)
def test_header_equals_gguf_py(quantized, q):
    from gguf import GGUFReader

    h = gguf_file.read_header(quantized[q])
    meta, tensors = h.meta, h.tensors
    r = GGUFReader(quantized[q])
    want = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert meta == want and len(meta["tokenizer.ggml.tokens"]) > 300
    assert [(t.name, t.dims, t.ggml_type, t.offset, t.nbytes) for t in tensors] == \
        [(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset), int(t.n_bytes))
         for t in r.tensors]


@pytest.mark.parametrize("q", QUANTS)
def test_native_dequantize_equals_numpy(quantized, q):
    from gguf import GGUFReader
    from gguf.quants import dequantize as numpy_dequantize

    types = set()
    for t in GGUFReader(quantized[q]).tensors:
        if t.tensor_type.name in ("F32", "F16"):
            continue
        types.add(t.tensor_type.name)
        assert gguf_file.native_to_float(int(t.tensor_type)) is not None, t.tensor_type.name
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        got = gguf_file.dequantize(t.data, int(t.tensor_type), shape)
        np.testing.assert_array_equal(got, numpy_dequantize(t.data, t.tensor_type).reshape(shape))
    assert types  # the file did hold quantized tensors


def test_truncated_or_garbled_headers_are_one_line_errors(quantized, tmp_path):
    data = quantized["Q8_0"].read_bytes()
    tensors = gguf_file.read_header(quantized["Q8_0"]).tensors
    header_end = min(t.offset for t in tensors)
    bad = tmp_path / "bad.gguf"
    for cut in list(range(0, 64, 7)) + list(range(64, header_end, max(1, header_end // 40))) + [len(data) - 1]:
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="bad.gguf"):
            gguf_file.read_header(bad)
    rng = np.random.default_rng(0)
    for _ in range(40):  # random bytes in the header: an error naming the file, or a header, never a crash
        b = bytearray(data[:header_end + 64])
        i = int(rng.integers(4, header_end))
        b[i:i + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        bad.write_bytes(bytes(b))
        try:
            gguf_file.read_header(bad)
        except CheckpointError as e:
            assert "bad.gguf" in str(e) and "\n" not in str(e)


@pytest.mark.parametrize("name", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_native_quantize_equals_gguf_py(name):
    """What convert writes: llama.cpp's encoder, byte for byte what gguf-py's numpy encoder (the one
    llama.cpp's own HF converter uses) writes, rounding ties included."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as numpy_quantize

    qtype = GGMLQuantizationType[name]
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((64, 512)) * 0.05).astype(np.float32)  # (R, C)
    x[0] = np.round(x[0] * 16) / 16  # exact ties for the rounding rules
    x[1, :32] = 0.0                  # an all-zero block
    x[2, :32] = 1e-30                # tiny scales
    got = gguf_file.quantize(x, int(qtype))
    np.testing.assert_array_equal(got, numpy_quantize(x, qtype).view(np.uint8).reshape(got.shape))
    assert got.shape[0] == 64
