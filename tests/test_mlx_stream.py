"""The streamed MLX export writes the folder mlx_lm.convert writes: same tensors (name, dtype, shape, bytes),
same config.json, index, tokenizer files and model card, same logits; also with tiny row pieces and shards."""

from __future__ import annotations

import contextlib
import io
import json
import sys

import numpy as np
import pytest

import epicode_edge.converters.mlx as mlx_export
from epicode_edge.converters.mlx import export_mlx
from epicode_edge.errors import EpicodeError
from factory import make_hf_model
from gguf_helpers import PROMPTS, mlx_last_logits

MODELS = {  # key: (arch, dtype, tie, shards)
    "llama": ("llama", "float32", False, 1),
    "qwen2": ("qwen2", "float32", True, 1),
    "qwen3_bf16": ("qwen3", "bfloat16", True, 1),
    "llama_f16_2shards": ("llama", "float16", False, 2),
}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlx_stream")
    return root, {k: make_hf_model(root / k, arch=a, dtype=d, tie=t, shards=s) for k, (a, d, t, s) in MODELS.items()}


def reference(src, out, bits, group_size=64):
    """mlx_lm.convert with export_mlx's arguments (its dtype rule included)."""
    from mlx_lm.convert import convert

    dtype = "float32" if bits is not None and sys.platform.startswith("linux") else None
    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(src), str(out), quantize=bits is not None, q_bits=bits,
                q_group_size=group_size if bits is not None else None, dtype=dtype)
    return out


def _raw(a):
    import mlx.core as mx

    return np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a).tobytes()


def assert_same_folder(got, ref):
    import mlx.core as mx

    names = sorted(p.name for p in got.iterdir())
    assert names == sorted(p.name for p in ref.iterdir())
    for name in names:
        if name.endswith(".safetensors"):
            a, meta_a = mx.load(str(got / name), return_metadata=True)
            b, meta_b = mx.load(str(ref / name), return_metadata=True)
            assert meta_a == meta_b == {"format": "mlx"}, name
            assert sorted(a) == sorted(b), name
            for k in b:
                assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), f"{name}: {k}"
                assert _raw(a[k]) == _raw(b[k]), f"{name}: {k} bytes differ"
        elif name.endswith(".json"):
            assert json.loads((got / name).read_text()) == json.loads((ref / name).read_text()), name
        else:
            assert (got / name).read_bytes() == (ref / name).read_bytes(), name
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):  # mlx_lm writes them byte for byte too
        assert (got / name).read_bytes() == (ref / name).read_bytes(), name


def assert_same_logits(got, ref):
    import mlx_lm

    (m1, t1), (m2, t2) = mlx_lm.load(str(got)), mlx_lm.load(str(ref))
    for text in PROMPTS:
        ids = t2.encode(text)
        assert t1.encode(text) == ids
        assert np.array_equal(mlx_last_logits(m1, ids), mlx_last_logits(m2, ids))


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("key", list(MODELS))
def test_stream_equals_mlx_lm_convert(key, bits, hf, tmp_path):
    root, src = hf
    got = export_mlx(src[key], tmp_path / "got", bits=bits)
    ref = reference(src[key], tmp_path / "ref", bits)
    assert_same_folder(got, ref)
    cfg = json.loads((got / "config.json").read_text())
    assert ("quantization" in cfg) == (bits is not None)
    if bits is None or key == "llama":
        assert_same_logits(got, ref)


@pytest.mark.parametrize("key,bits", [("llama", 4), ("qwen3_bf16", 8), ("qwen2", None), ("llama_f16_2shards", None)])
def test_row_pieces_equal_whole_tensors(key, bits, hf, tmp_path, monkeypatch):
    """Pieces of 3 rows (the last one shorter): each piece is quantized or cast alone, the tensors are
    those of mlx_lm.convert, which works on whole tensors."""
    root, src = hf
    monkeypatch.setattr(mlx_export, "PIECE_BYTES", 3 * 64 * 4)
    seen = []
    real = mlx_export._row_pieces

    def spy(a):
        for piece in real(a):
            seen.append((a.shape, piece.shape))
            yield piece

    monkeypatch.setattr(mlx_export, "_row_pieces", spy)
    got = export_mlx(src[key], tmp_path / "got", bits=bits)
    assert any(full[0] > 3 and piece[0] == 3 for full, piece in seen)  # really in pieces
    assert any(full[0] % 3 and piece[0] == full[0] % 3 for full, piece in seen if len(full) == 2)
    assert_same_folder(got, reference(src[key], tmp_path / "ref", bits))


@pytest.mark.parametrize("bits", [None, 4])
def test_shards_follow_mlx_lm(bits, hf, tmp_path, monkeypatch):
    """With mlx_lm's shard rule at a tiny size, both write the same model-0000k-of-0000n files and index."""
    import mlx_lm.utils as mu

    def tiny_shards(weights, max_file_size_gb=None):
        shards, size = [], 0
        for k, v in weights.items():
            if not shards or size + v.nbytes > 20_000:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += v.nbytes
        return shards

    monkeypatch.setattr(mu, "make_shards", tiny_shards)
    root, src = hf
    got = export_mlx(src["llama"], tmp_path / "got", bits=bits)
    shards = sorted(p.name for p in got.glob("model*.safetensors"))
    assert len(shards) >= 3 and shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                                           for k in range(1, len(shards) + 1)]
    assert_same_folder(got, reference(src["llama"], tmp_path / "ref", bits))


def test_failure_leaves_nothing(hf, tmp_path):
    """A truncated input tensor file: one error, and neither the folder nor its .part."""
    import shutil

    root, src = hf
    bad = tmp_path / "bad"
    shutil.copytree(src["llama"], bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(EpicodeError, match="bad"):
        export_mlx(bad, tmp_path / "out", bits=4)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.part").exists()


@pytest.mark.parametrize("bits", [None, 4])
def test_every_tensor_streams_from_the_input(bits, hf, tmp_path, monkeypatch):
    """For llama/qwen2/qwen3 every output tensor is cast or quantized from rows of one input tensor:
    none falls back to evaluating the lazy mlx_lm model."""
    root, src = hf
    kinds = []
    real = mlx_export._plan

    def spy(*a):
        jobs = real(*a)
        kinds.extend(j.kind for j in jobs)
        return jobs

    monkeypatch.setattr(mlx_export, "_plan", spy)
    for key in MODELS:
        export_mlx(src[key], tmp_path / key, bits=bits)
    assert kinds and set(kinds) == ({"copy", "quant"} if bits else {"copy"})


@pytest.mark.parametrize("bits", [None, 8])
def test_lazy_fallback_equals_mlx_lm_convert(bits, hf, tmp_path, monkeypatch):
    """Tensors not traced to one input tensor are evaluated whole from the lazy model: the same folder."""
    root, src = hf
    monkeypatch.setattr(mlx_export, "_sources", lambda *a: {})
    got = export_mlx(src["qwen3_bf16"], tmp_path / "got", bits=bits)
    assert_same_folder(got, reference(src["qwen3_bf16"], tmp_path / "ref", bits))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_rows_are_rows_of_the_whole(dtype):
    """Affine groups run along the last axis: quantizing rows start:end alone gives exactly those rows of
    the whole tensor's weight, scales and biases (what the row pieces rely on)."""
    import mlx.core as mx

    x = mx.random.normal((11, 128), key=mx.random.key(0)).astype(getattr(mx, dtype))
    for bits in (4, 8):
        for group_size in (32, 64, 128):
            whole = mx.quantize(x, group_size=group_size, bits=bits)
            parts = [mx.quantize(x[a:b], group_size=group_size, bits=bits) for a, b in ((0, 3), (3, 7), (7, 11))]
            for k in range(3):
                assert _raw(mx.concatenate([p[k] for p in parts])) == _raw(whole[k]), (bits, group_size, k)
