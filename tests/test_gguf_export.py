"""HF -> GGUF export: llama.cpp on our GGUF against mlx_lm on the same HF folder (two independent engines).

Measured on the tiny factory models (max |logit| about 13), relative to max |logit| of the MLX F32 logits:
F32 ~1e-6 (abs ~3e-5), F16 ~2e-3, BF16 ~1.4e-2, Q8_0 ~3-5e-2 (llama.cpp also quantizes activations to 8 bits).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import gguf
from epicode_edge.converters import gguf as gx
from epicode_edge.errors import InputError, UnsupportedError
from factory import CHAT_TEMPLATE, make_hf_model
from gguf_helpers import PROMPTS, llama_last_logits, llama_model, mlx_last_logits, mlx_load_f32

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

SPECS = {  # key -> (arch, dtype, make_hf_model kwargs)
    "llama": ("llama", "float32", {}),
    "qwen2": ("qwen2", "float32", {}),
    "qwen3": ("qwen3", "float32", {}),
    "llama_tied": ("llama", "float32", {"tie": True}),
    "qwen2_tied": ("qwen2", "float32", {"tie": True}),
    "llama_f16": ("llama", "float16", {"shards": 2}),
    "qwen3_bf16": ("qwen3", "bfloat16", {}),
    "llama_k": ("llama", "float32", {"hidden": 256, "intermediate": 512}),  # K-quant friendly rows
    "llama_rope3": ("llama", "float32", {"heads": 2, "kv_heads": 1}),      # + llama3 rope scaling
    "mistral": ("llama", "float32", {"kv_heads": 1}),                      # model_type mistral
}
CONFIG_EDITS = {
    "llama_rope3": {"rope_scaling": LLAMA3_ROPE},
    "mistral": {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": None},
}


@pytest.fixture(scope="session")
def hf(tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("gguf_hf"), {}

    def get(key):
        if key not in cache:
            arch, dtype, kw = SPECS[key]
            path = make_hf_model(root / key, arch=arch, dtype=dtype, seed=len(cache), **kw)
            if key in CONFIG_EDITS:
                cfg = json.loads((path / "config.json").read_text())
                cfg.update(CONFIG_EDITS[key])
                (path / "config.json").write_text(json.dumps(cfg))
            cache[key] = path
        return cache[key]
    return get


@pytest.fixture(scope="session")
def gguf_file(hf, tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("gguf_out"), {}

    def get(key, quant="F32"):
        if (key, quant) not in cache:
            cache[key, quant] = gx.hf_to_gguf(hf(key), root / f"{key}-{quant}.gguf", quant)
        return cache[key, quant]
    return get


@pytest.fixture(scope="session")
def mlx_ref(hf):
    cache = {}

    def get(key):
        if key not in cache:
            cache[key] = mlx_load_f32(hf(key))
        return cache[key]
    return get


def _diffs(llm, model, tok):
    """Per prompt: (max abs diff, max |mlx logit|, argmax equal)."""
    out = []
    for text in PROMPTS:
        ids = tok.encode(text)
        a, b = llama_last_logits(llm, ids), mlx_last_logits(model, ids)
        out.append((float(np.abs(a - b).max()), float(np.abs(b).max()), a.argmax() == b.argmax()))
    return out


@pytest.mark.parametrize("key", ["llama", "qwen2", "qwen3", "llama_tied", "qwen2_tied", "llama_f16",
                                 "qwen3_bf16", "llama_rope3", "mistral"])
def test_f32_gguf_matches_mlx(key, gguf_file, mlx_ref):
    model, tok = mlx_ref(key)
    llm = llama_model(gguf_file(key))
    for diff, scale, _ in _diffs(llm, model, tok):
        assert scale > 1.0  # logits are spread: a broken model would not hide in a tiny diff
        assert diff < 1e-3


@pytest.mark.parametrize("key,quant,rel_tol", [
    ("llama", "F16", 5e-3), ("qwen2", "F16", 5e-3), ("qwen3", "BF16", 3e-2), ("llama", "BF16", 3e-2),
    ("llama", "Q8_0", 0.1), ("qwen2", "Q8_0", 0.1), ("qwen3", "Q8_0", 0.1),
])
def test_direct_quants_stay_close(key, quant, rel_tol, gguf_file, mlx_ref):
    model, tok = mlx_ref(key)
    llm = llama_model(gguf_file(key, quant))
    diffs = _diffs(llm, model, tok)
    for diff, scale, _ in diffs:
        assert diff / scale < rel_tol
    assert sum(same for *_, same in diffs) >= 2


KTYPES = {"Q4_K_M": {"Q4_K", "Q5_K", "Q6_K"}, "Q5_K_M": {"Q5_K", "Q6_K"}, "Q6_K": {"Q6_K"}, "Q4_0": {"Q4_0"}}


@pytest.mark.parametrize("quant", list(KTYPES))
def test_llama_cpp_quants_load_and_generate(quant, gguf_file, capfd):
    capfd.readouterr()
    path = gguf_file("llama_k", quant)
    assert capfd.readouterr().err == ""  # llama.cpp's quantizer notes do not leak out of the library
    assert sorted(p.name for p in path.parent.glob(path.name + "*")) == [path.name]  # no intermediate left
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] in KTYPES[quant]
    assert types["blk.0.attn_norm.weight"] == "F32"
    llm, ref = llama_model(path), llama_model(gguf_file("llama_k"))
    ids = llm.tokenize(PROMPTS[0].encode(), add_bos=True, special=True)
    q, f = llama_last_logits(llm, ids), llama_last_logits(ref, ids)
    assert np.isfinite(q).all()
    assert np.corrcoef(q, f)[0, 1] > 0.8
    out = [t for _, t in zip(range(8), llm.generate(ids, temp=0.0))]  # greedy, 8 tokens
    assert len(out) == 8 and all(0 <= t < llm.n_vocab() for t in out)


def test_kquant_falls_back_for_small_rows(gguf_file):
    """Rows of 64 are not K-quant blocks (256): llama.cpp picks a fallback type; the model still runs."""
    path = gguf_file("llama", "Q4_K_M")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] in {"Q5_0", "Q5_1", "Q8_0", "Q4_0", "Q4_1"}
    llm = llama_model(path)
    assert np.isfinite(llama_last_logits(llm, [0, 10, 20])).all()


def _fields(path):
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


def test_metadata_llama(gguf_file):
    f, tensors = _fields(gguf_file("llama", "Q8_0"))
    assert f["general.architecture"] == "llama"
    assert (f["llama.context_length"], f["llama.embedding_length"], f["llama.block_count"]) == (512, 64, 2)
    assert (f["llama.feed_forward_length"], f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (128, 4, 2)
    assert f["llama.rope.freq_base"] == 10000.0 and f["llama.rope.dimension_count"] == 16
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"], f["tokenizer.ggml.eot_token_id"]) == (0, 4, 4)
    assert f["tokenizer.ggml.padding_token_id"] == 1
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_eos_token"] is False
    assert f["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert len(f["tokenizer.ggml.tokens"]) == 384 and f["tokenizer.ggml.merges"]
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"
    assert tensors["blk.0.ffn_norm.weight"].tensor_type.name == "F32"
    assert "output.weight" in tensors


def test_metadata_tied_and_qwen3(gguf_file):
    _, tensors = _fields(gguf_file("llama_tied"))
    assert "output.weight" not in tensors and "token_embd.weight" in tensors
    f, tensors = _fields(gguf_file("qwen3"))
    assert f["qwen3.attention.key_length"] == 16 and f["tokenizer.ggml.pre"] == "gpt-2"
    assert "blk.1.attn_k_norm.weight" in tensors
    f, tensors = _fields(gguf_file("qwen2"))
    assert "blk.0.attn_q.bias" in tensors


def test_llama3_rope_factors(gguf_file):
    _, tensors = _fields(gguf_file("llama_rope3"))
    freqs = np.asarray(tensors["rope_freqs.weight"].data)
    assert freqs.shape == (16,) and freqs.min() == 1.0 and freqs.max() == 8.0


# ---------------------------------------------------------------------------------------- the sink

def _hf_tensors(path):
    from epicode_edge.converters.checkpoint import open_checkpoint

    return open_checkpoint(path)


def test_sink_order_free_and_same_as_hf_to_gguf(hf, gguf_file, tmp_path, monkeypatch):
    """Reversed write order and row-chunked encoding (a few rows per step) give the same bytes."""
    ck = _hf_tensors(hf("qwen2"))
    monkeypatch.setattr(gx, "_CHUNK_ELEMENTS", 200)
    tensors = {n: (t.shape, t.dtype) for n, t in ck.tensors.items()}
    out = tmp_path / "rev.gguf"
    with gx.GGUFSink(out, config=ck.config, tensors=tensors, tokenizer_dir=ck.tokenizer_dir, quant="Q8_0",
                     name=hf("qwen2").name) as sink:
        for n in reversed(list(tensors)):
            sink.write(n, ck.read_f32(n))
    assert out.read_bytes() == gguf_file("qwen2", "Q8_0").read_bytes()
    via = gx.gguf_sink_for(ck, tmp_path / "via.gguf", "Q8_0")
    for n in tensors:
        via.write(n, ck.read_f32(n))
    assert via.close().read_bytes() == out.read_bytes()


def test_sink_abort_and_errors_leave_nothing(hf, tmp_path):
    ck = _hf_tensors(hf("llama"))
    tensors = {n: (t.shape, t.dtype) for n, t in ck.tensors.items()}
    first = next(iter(tensors))
    for quant in ("F32", "Q4_K_M"):
        with pytest.raises(RuntimeError):
            with gx.GGUFSink(tmp_path / "x.gguf", config=ck.config, tensors=tensors, tokenizer_dir=ck.tokenizer_dir,
                             quant=quant) as sink:
                sink.write(first, ck.read_f32(first))
                raise RuntimeError("interrupted")
        assert list(tmp_path.iterdir()) == []
        sink = gx.GGUFSink(tmp_path / "x.gguf", config=ck.config, tensors=tensors, tokenizer_dir=ck.tokenizer_dir,
                           quant=quant)
        sink.write(first, ck.read_f32(first))
        with pytest.raises(InputError, match="never written"):
            sink.close()
        assert list(tmp_path.iterdir()) == []
    sink = gx.GGUFSink(tmp_path / "x.gguf", config=ck.config, tensors=tensors, tokenizer_dir=ck.tokenizer_dir)
    with pytest.raises(InputError, match="shape"):
        sink.write(first, np.zeros((3, 3), np.float32))
    with pytest.raises(InputError, match="not announced"):
        sink.write("model.nonexistent.weight", np.zeros(3, np.float32))
    sink.abort()
    assert list(tmp_path.iterdir()) == []


def test_gguf_to_gguf_copy_sink(gguf_file, tmp_path):
    from epicode_edge.converters.checkpoint import open_checkpoint

    src = gguf_file("qwen3")
    ck = open_checkpoint(src)
    assert ck.format == "gguf"
    outs = {}
    for quant in ("F32", "Q8_0", "Q4_K_M"):
        sink = gx.gguf_sink_for(ck, tmp_path / f"copy-{quant}.gguf", quant)
        assert isinstance(sink, gx.GGUFCopySink)
        for n in ck.tensors:
            sink.write(n, ck.read_f32(n))
        outs[quant] = sink.close()
    f_src, t_src = _fields(src)
    f_cp, t_cp = _fields(outs["F32"])
    assert {k: v for k, v in f_cp.items() if not k.startswith("GGUF.")} == {
        k: v for k, v in f_src.items() if not k.startswith("GGUF.")}
    for n, t in t_src.items():
        assert np.array_equal(np.asarray(t_cp[n].data), np.asarray(t.data)), n
    assert _fields(outs["Q8_0"])[0]["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    ids = [0, 5, 17, 99, 200]
    ref = llama_last_logits(llama_model(src), ids)
    assert np.array_equal(llama_last_logits(llama_model(outs["F32"]), ids), ref)
    q8 = llama_last_logits(llama_model(outs["Q8_0"]), ids)
    assert np.abs(q8 - ref).max() / np.abs(ref).max() < 0.1
    q4 = llama_last_logits(llama_model(outs["Q4_K_M"]), ids)  # requantized by llama.cpp from the copy
    assert np.isfinite(q4).all() and np.corrcoef(q4, ref)[0, 1] > 0.8
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in outs.values())


def test_copied_metadata_is_what_gguf_py_packs(gguf_file, tmp_path):
    """copy_metadata writes the source's stored bytes: the same file as gguf-py packing the decoded values."""
    from epicode_edge.converters.gguf_file import read_header

    h = read_header(gguf_file("qwen2", "Q8_0"))
    assert len(h.raw["tokenizer.ggml.tokens"]) > 300 and "tokenizer.ggml.merges" in h.raw
    files = []
    for writer in (gguf.GGUFWriter, gx._Writer):
        w = writer(tmp_path / f"{writer.__name__}.gguf", "qwen2")
        if writer is gx._Writer:
            gx.copy_metadata(h, w)
        else:
            for key, value in h.raw.items():
                if key not in gx._OWN_KEYS:
                    vtype, sub = h.types[key]
                    w.add_key_value(key, value, gguf.GGUFValueType(vtype),
                                    sub_type=gguf.GGUFValueType(sub) if sub is not None else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        files.append((tmp_path / f"{writer.__name__}.gguf").read_bytes())
    assert files[0] == files[1] and len(files[0]) > 4000


def test_copy_sink_rows_in_pieces(gguf_file, tmp_path):
    """write_rows: pieces of rows in order give write()'s bytes; a gap, an overlap or a wrong width is refused."""
    from epicode_edge.converters.checkpoint import open_checkpoint

    ck = open_checkpoint(gguf_file("llama", "F32"))
    whole = gx.gguf_sink_for(ck, tmp_path / "whole.gguf", "Q8_0")
    pieces = gx.gguf_sink_for(ck, tmp_path / "pieces.gguf", "Q8_0")
    for n in ck.tensors:
        x = ck.read_f32(n)
        whole.write(n, x)
        rows = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)  # (R, C)
        for i in range(0, len(rows), 7):
            pieces.write_rows(n, i, rows[i:i + 7])
    assert pieces.close().read_bytes() == whole.close().read_bytes()
    sink = gx.gguf_sink_for(ck, tmp_path / "bad.gguf", "Q8_0")
    rows = ck.read_f32("token_embd.weight")  # (V, C)
    sink.write_rows("token_embd.weight", 0, rows[:5])
    for start, piece in ((6, rows[6:9]), (4, rows[4:9]), (5, rows[5:9, :-1]), (5, rows[5:].repeat(2, axis=0))):
        with pytest.raises(InputError, match="do not continue"):
            sink.write_rows("token_embd.weight", start, piece)
    sink.write_rows("token_embd.weight", 5, rows[5:])
    with pytest.raises(InputError, match="written twice"):
        sink.write_rows("token_embd.weight", 0, rows[:1])
    sink.abort()
    assert not (tmp_path / "bad.gguf").exists()


# ------------------------------------------------------------------------------------- bad input

def test_unknown_quant(hf, tmp_path):
    with pytest.raises(UnsupportedError, match=r"unknown quant type 'Q3_K'.*Q4_K_M"):
        gx.hf_to_gguf(hf("llama"), tmp_path / "x.gguf", "Q3_K")
    assert list(tmp_path.iterdir()) == []
    assert gx.check_quant("q8_0") == "Q8_0"
    assert set(gx.SUPPORTED_QUANTS) == {"F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"}


def _edited(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unsupported_arch(hf, tmp_path):
    bad = _edited(hf("llama"), tmp_path / "gpt2", model_type="gpt2")
    with pytest.raises(UnsupportedError, match=r"architecture 'gpt2'.*llama, mistral, qwen2, qwen3"):
        gx.hf_to_gguf(bad, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob("x.gguf*"))


def test_config_missing_field(hf, tmp_path):
    bad = _edited(hf("llama"), tmp_path / "nohead", num_attention_heads=None)
    with pytest.raises(InputError, match="^config.json missing num_attention_heads$"):
        gx.hf_to_gguf(bad, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("x.gguf*"))


def test_unmappable_tensor(hf, tmp_path):
    ck = _hf_tensors(hf("llama"))
    tensors = {n: (t.shape, t.dtype) for n, t in ck.tensors.items()}
    tensors["model.layers.0.mystery.weight"] = ((4, 4), "F32")
    with pytest.raises(UnsupportedError, match="model.layers.0.mystery.weight"):
        gx.GGUFSink(tmp_path / "x.gguf", config=ck.config, tensors=tensors, tokenizer_dir=ck.tokenizer_dir)
    assert list(tmp_path.iterdir()) == []


def test_vocab_padded_beyond_tokenizer(tmp_path):
    """config vocab_size larger than the tokenizer (as Qwen ships): the extra ids become unused [PAD] tokens."""
    from factory import make_config, make_tokenizer, random_weights, write_hf

    tok = make_tokenizer(tmp_path / "tok")
    cfg = make_config("qwen2", 400)
    hf = write_hf(tmp_path / "hf", cfg, random_weights(cfg, 3), tok)
    path = gx.hf_to_gguf(hf, tmp_path / "m.gguf")
    f, _ = _fields(path)
    assert len(f["tokenizer.ggml.tokens"]) == 400 and f["tokenizer.ggml.tokens"][399] == "[PAD399]"
    assert f["tokenizer.ggml.token_type"][399] == int(gguf.TokenType.UNUSED)
    model, tok_hf = mlx_load_f32(hf)
    for diff, _, _ in _diffs(llama_model(path), model, tok_hf):
        assert diff < 1e-3
