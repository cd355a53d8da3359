"""converters/checkpoint.py: HF folders (single, sharded, with/without index; f32/f16/bf16) and GGUF files,
read lazily; every bad input is a one-line CheckpointError naming the file."""

import json
import shutil
import struct

import numpy as np
import pytest
from factory import make_hf_model, make_tokenizer, random_weights, write_hf

from epicode_edge.converters.checkpoint import TensorInfo, open_checkpoint
from epicode_edge.converters.safetensors_io import to_f32, write_safetensors
from epicode_edge.errors import CheckpointError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def models(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for dtype in ("float32", "float16", "bfloat16"):
        for shards in (1, 3):
            out[dtype, shards] = make_hf_model(root / f"{dtype}-{shards}", "qwen2", dtype, shards, seed=3,
                                               tokenizer_dir=tok)
    return out


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("dtype,tag", [("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16")])
def test_hf_single_and_sharded_read_the_same(models, dtype, tag):
    single, sharded = open_checkpoint(models[dtype, 1]), open_checkpoint(models[dtype, 3])
    assert single.format == sharded.format == "hf" and single.arch == "qwen2"
    assert set(single.tensors) == set(sharded.tensors)
    assert sharded._where[next(iter(sharded.tensors))].path.name.startswith("model-00001")
    for name, info in single.tensors.items():
        assert info.dtype == tag and sharded.tensors[name] == info
        np.testing.assert_array_equal(single.read(name), sharded.read(name))
        assert single.read_f32(name).dtype == np.float32
    assert single.tokenizer_hash() == sharded.tokenizer_hash()


def test_values_match_the_generator(models):
    ckpt = open_checkpoint(models["float32", 3])
    cfg = json.loads((models["float32", 3] / "config.json").read_text())
    expected = random_weights(cfg, seed=3)
    assert list(ckpt.tensors)[0] == "model.embed_tokens.weight"  # file order, shard by shard
    for name, w in expected.items():
        np.testing.assert_array_equal(ckpt.read_f32(name), w)
    assert ckpt.nbytes == sum(w.nbytes for w in expected.values())


def test_shards_without_index(models, tmp_path):
    d = shutil.copytree(models["bfloat16", 3], tmp_path / "m")
    (d / "model.safetensors.index.json").unlink()
    a, b = open_checkpoint(d), open_checkpoint(models["bfloat16", 3])
    assert a.tensors == b.tensors
    assert a.content_hash() == b.content_hash()


def test_tokenizer_hash_sees_any_tokenizer_change(models, tmp_path):
    d = shutil.copytree(models["float32", 1], tmp_path / "m")
    h = open_checkpoint(d).tokenizer_hash()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] += " "
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert open_checkpoint(d).tokenizer_hash() != h
    assert "tokenizer_config.json" in open_checkpoint(d).tokenizer_digests()


def test_reads_are_lazy_maps(models):
    ckpt = open_checkpoint(models["bfloat16", 1])
    a = ckpt.read("model.embed_tokens.weight")
    assert isinstance(a, np.memmap) and not a.flags.writeable and a.dtype == np.uint16


# ---------------------------------------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def gguf_f32(models, tmp_path_factory):
    from epicode_edge.converters.gguf import hf_to_gguf

    out = tmp_path_factory.mktemp("gguf") / "m-F32.gguf"
    return hf_to_gguf(models["float32", 1], out, "F32")


def test_gguf_file_reads_like_the_hf_folder(gguf_f32, models):
    g, h = open_checkpoint(gguf_f32), open_checkpoint(models["float32", 1])
    assert g.format == "gguf" and g.arch == "qwen2" and g.tokenizer_dir is None
    assert g.tensors["token_embd.weight"] == TensorInfo("token_embd.weight", "F32", (384, 64), 384 * 64 * 4)
    np.testing.assert_array_equal(g.read_f32("token_embd.weight"), h.read_f32("model.embed_tokens.weight"))
    np.testing.assert_array_equal(g.read_f32("blk.1.ffn_down.weight"), h.read_f32("model.layers.1.mlp.down_proj.weight"))
    assert g.config["qwen2.block_count"] == 2
    assert len(g.tokenizer_hash()) == 64 and "tokenizer.ggml.tokens" in g.tokenizer_digests()


def test_gguf_quantized_tensors_are_dequantized(models, tmp_path):
    from epicode_edge.converters.gguf import hf_to_gguf

    g = open_checkpoint(hf_to_gguf(models["float32", 1], tmp_path / "q.gguf", "Q8_0"))
    h = open_checkpoint(models["float32", 1])
    assert g.tensors["blk.0.ffn_up.weight"].dtype == "Q8_0"
    w = g.read_f32("blk.0.ffn_up.weight")
    ref = h.read_f32("model.layers.0.mlp.up_proj.weight")
    assert w.shape == ref.shape and w.dtype == np.float32
    assert np.abs(w - ref).max() < 0.02 * np.abs(ref).max() and not np.array_equal(w, ref)


def test_corrupted_gguf(gguf_f32, tmp_path):
    bad = tmp_path / "bad.gguf"
    data = bytearray(gguf_f32.read_bytes())
    data[:4] = b"XXXX"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="bad.gguf: corrupted or truncated GGUF") as e:
        open_checkpoint(bad)
    one_line(e)


def test_truncated_gguf(gguf_f32, tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(gguf_f32.read_bytes()[: gguf_f32.stat().st_size - 1000])
    with pytest.raises(CheckpointError, match="cut.gguf: .*truncated"):
        open_checkpoint(bad)
    bad.write_bytes(gguf_f32.read_bytes()[:200])  # inside the metadata
    with pytest.raises(CheckpointError, match="cut.gguf"):
        open_checkpoint(bad)


# ---------------------------------------------------------------------------------------------- bad inputs


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="nope: no such file or directory") as e:
        open_checkpoint(tmp_path / "nope")
    one_line(e)


def test_folder_without_weights(models, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"empty: no weights \(\*\.safetensors\)"):
        open_checkpoint(d)
    (d / "pytorch_model.bin").write_bytes(b"0")
    with pytest.raises(CheckpointError, match="PyTorch weights are not supported"):
        open_checkpoint(d)


def test_folder_without_config(models, tmp_path):
    d = shutil.copytree(models["float32", 1], tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        open_checkpoint(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: invalid JSON"):
        open_checkpoint(d)


def test_other_file_is_refused(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("hello")
    with pytest.raises(CheckpointError, match="weights.txt: not an HF model folder or a .gguf file"):
        open_checkpoint(f)


def test_truncated_safetensors(models, tmp_path):
    d = shutil.copytree(models["bfloat16", 3], tmp_path / "m")
    shard = d / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003.safetensors: truncated: tensor") as e:
        open_checkpoint(d)
    one_line(e)
    shard.write_bytes(b"\x05")
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003.safetensors: truncated safetensors file"):
        open_checkpoint(d)


def test_corrupted_safetensors_header(models, tmp_path):
    d = shutil.copytree(models["float32", 1], tmp_path / "m")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: corrupted safetensors header"):
        open_checkpoint(d)
    f.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="model.safetensors: corrupted safetensors header"):
        open_checkpoint(d)


def test_index_referencing_a_missing_shard(models, tmp_path):
    d = shutil.copytree(models["float16", 3], tmp_path / "m")
    (d / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="index.json: references missing shard model-00003-of-00003"):
        open_checkpoint(d)


def test_index_listing_a_tensor_its_shard_lacks(models, tmp_path):
    d = shutil.copytree(models["float16", 3], tmp_path / "m")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra.weight"] = "model-00001-of-00003.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'model.extra.weight' listed in .* is not in this shard"):
        open_checkpoint(d)


def test_unsupported_dtype(tmp_path, tok):
    cfg = {"model_type": "llama"}
    d = tmp_path / "m"
    write_hf(d, dict(cfg, bos_token_id=0, eos_token_id=1), {"w": np.zeros((2, 2), np.float32)}, tok)
    write_safetensors(d / "model.safetensors", {"w": (np.zeros((2, 2), np.float64), "F64")})
    with pytest.raises(CheckpointError, match="tensor 'w' has unsupported dtype F64"):
        open_checkpoint(d)


def test_bf16_roundtrip_exact(models):
    ckpt = open_checkpoint(models["bfloat16", 1])
    stored = ckpt.read("model.norm.weight")
    f32 = to_f32(stored, "BF16")
    assert (f32.view(np.uint32) & 0xFFFF).max() == 0  # bf16 values are f32 with empty low bits
