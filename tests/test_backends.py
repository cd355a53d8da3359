"""backends/: llama.cpp and MLX behind the Backend protocol, on tiny real models (no mocks)."""

import json
import shutil

import numpy as np
import pytest

from epicode_edge.backends.base import Backend, check_same_vocab
from epicode_edge.errors import BackendError, ContextFullError, InputError, MismatchError, ParameterError
from rt_models import N_THREADS, bundle_dir, pair_dir, bundle  # noqa: F401 (fixture)

TEXTS = ["Hello world", "Café crème, naïve 東京 😀", "  leading spaces\tand\nnewlines\n\n", "def add(a, b):"]


def open_llama(path, **kw):
    from epicode_edge.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend(path, **{"n_ctx": 256, "n_threads": N_THREADS, **kw})


def open_mlx(path, **kw):
    from epicode_edge.backends.mlx import MLXBackend

    return MLXBackend(path, **{"n_ctx": 256, **kw})


@pytest.fixture(scope="module", params=["llama.cpp", "mlx"])
def expert(request, bundle):
    b = open_llama(bundle / "gguf/expert-F32.gguf", kv_type="f32") if request.param == "llama.cpp" \
        else open_mlx(bundle / "mlx/expert")
    yield b
    b.close()


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(pair_dir(tmp_path_factory) / "finetuned/tokenizer.json"))


def test_is_a_backend_with_the_models_metadata(expert):
    assert isinstance(expert, Backend)
    assert expert.vocab_size == 384 and expert.bos_id == 0 and expert.add_bos
    assert {1, 4} <= expert.eos_ids  # <|end_of_text|> and <|eot_id|> (the tokenizer's eos)
    assert expert.bos_token == "<|begin_of_text|>" and expert.eos_token == "<|eot_id|>"
    from factory import CHAT_TEMPLATE

    assert expert.chat_template == CHAT_TEMPLATE
    assert expert.token_texts()[:5] == ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                        "<|end_header_id|>", "<|eot_id|>"]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizes_as_the_hf_tokenizer_does_by_default(expert, hf_tokenizer, text):
    assert expert.tokenize(text) == hf_tokenizer.encode(text).ids  # BOS added, as the tokenizer's default
    assert expert.tokenize(text, add_bos=False) == hf_tokenizer.encode(text, add_special_tokens=False).ids
    assert expert.detokenize(expert.tokenize(text)) == text.encode("utf-8")  # BOS renders as nothing


def test_special_tokens_in_text(expert):
    ids = expert.tokenize("<|start_header_id|>user<|end_header_id|>", add_bos=False)
    assert ids[0] == 2 and ids[-1] == 3
    assert expert.token_bytes(4) == b"" and expert.token_bytes(0) == b""


def test_token_bytes_can_be_partial_utf8(expert):
    pieces = [expert.token_bytes(i) for i in expert.tokenize("😀", add_bos=False)]
    assert b"".join(pieces) == "😀".encode() and len(pieces) > 1


def test_incremental_decoding_equals_one_prefill(expert):
    ids = expert.tokenize("The quick brown fox jumps over the lazy dog.")
    expert.truncate(0)
    full = expert.prefill(ids).copy()
    assert full.dtype == np.float32 and full.shape == (384,)
    expert.truncate(0)
    expert.prefill(ids[:5])
    for t in ids[5:-1]:
        expert.step(t)
    last = expert.step(ids[-1])
    np.testing.assert_allclose(last, full, atol=1e-4)
    assert expert.n_past == len(ids) and expert.tokens == ids


def test_truncate_then_prefill_equals_a_fresh_prefix(expert):
    a = expert.tokenize("Question: what is 17 + 25?")
    b = expert.tokenize("Question: what is 3 * 4?")
    k = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    expert.truncate(0)
    fresh = expert.prefill(b).copy()
    expert.truncate(0)
    expert.prefill(a)
    expert.truncate(k)
    assert expert.n_past == k
    np.testing.assert_allclose(expert.prefill(b[k:]), fresh, atol=1e-4)


def test_an_interrupted_forward_is_dropped_from_the_engine_cache(expert):
    ids = expert.tokenize("Law, math and logic")
    expert.truncate(0)
    fresh = expert.prefill(ids).copy()
    expert.truncate(0)
    expert.prefill(ids[:4])
    expert._forward([77, 78])  # the engine cached two positions...
    expert._dirty = True        # ...and Ctrl-C arrived before the bookkeeping: the next call drops them
    np.testing.assert_allclose(expert.prefill(ids[4:]), fresh, atol=1e-4)


def test_counters(expert):
    expert.truncate(0)
    expert.reset_counters()
    expert.prefill([0, 5, 6])
    expert.step(7)
    expert.step(8)
    c = expert.counters
    assert (c.prefill_calls, c.prefill_tokens, c.step_calls, c.forward_calls, c.tokens) == (1, 3, 2, 3, 5)
    assert c.forward_seconds > 0
    expert.truncate(1)
    assert expert.counters.truncations == 1
    with pytest.raises(ParameterError, match="cannot truncate"):
        expert.truncate(5)


def test_context_full(expert):
    expert.truncate(0)
    with pytest.raises(ContextFullError, match="exceed the context of 256"):
        expert.prefill([5] * 257)
    assert expert.n_past == 0


def test_long_prefill_in_chunks_equals_one_chunk(bundle, monkeypatch):
    import epicode_edge.backends.mlx as mlx_backend

    ids = list(range(5, 45))
    one = open_llama(bundle / "gguf/expert-F32.gguf", kv_type="f32")
    chunked = open_llama(bundle / "gguf/expert-F32.gguf", kv_type="f32", n_batch=16)
    np.testing.assert_allclose(chunked.prefill(ids), one.prefill(ids), atol=1e-4)
    m = open_mlx(bundle / "mlx/expert")
    ref = m.prefill(ids).copy()
    m.truncate(0)
    monkeypatch.setattr(mlx_backend, "PREFILL_CHUNK", 16)
    np.testing.assert_allclose(m.prefill(ids), ref, atol=1e-4)
    for b in (one, chunked, m):
        b.close()


def test_llama_cpp_and_mlx_agree_on_f32_logits(bundle):
    ids = [0, 44, 73, 349, 83, 225, 91, 360, 80, 72]
    lc = open_llama(bundle / "gguf/expert-F32.gguf", kv_type="f32")
    mx = open_mlx(bundle / "mlx/expert")
    np.testing.assert_allclose(lc.prefill(ids), mx.prefill(ids), atol=1e-3)
    for t in (7, 300):
        np.testing.assert_allclose(lc.step(t), mx.step(t), atol=1e-3)
    assert lc.token_texts() == mx.token_texts()
    assert [lc.token_bytes(i) for i in range(384)] == [mx.token_bytes(i) for i in range(384)]
    assert lc.eos_ids == mx.eos_ids
    lc.close()


# ----------------------------------------------------------------------------------------------
# bad models, vocabulary checks
# ----------------------------------------------------------------------------------------------


def test_missing_and_broken_model_files(tmp_path):
    with pytest.raises(InputError, match="GGUF model file not found"):
        open_llama(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(BackendError, match="llama.cpp cannot load the model"):
        open_llama(bad)
    with pytest.raises(InputError, match="no config.json"):
        open_mlx(tmp_path)
    with pytest.raises(ParameterError, match="kv_type"):
        open_llama(bad, kv_type="f8")


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    """Models whose vocabulary differs from the bundle's: by size, and by one token's text (same size)."""
    from epicode_edge.converters.gguf import hf_to_gguf
    from factory import make_hf_model, make_tokenizer

    root = tmp_path_factory.mktemp("odd")
    big = make_hf_model(root / "big", tokenizer_dir=make_tokenizer(root / "tok400", vocab_size=400))
    tok = root / "tok_swapped"
    shutil.copytree(pair_dir(tmp_path_factory) / "tokenizer", tok)
    spec = json.loads((tok / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = [t for t, i in vocab.items() if i in (100, 101)]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same tokens, two ids swapped
    (tok / "tokenizer.json").write_text(json.dumps(spec))
    swapped = make_hf_model(root / "swapped", tokenizer_dir=tok)
    return {"size": (big, hf_to_gguf(big, root / "big.gguf")),
            "text": (swapped, hf_to_gguf(swapped, root / "swapped.gguf"))}


@pytest.mark.parametrize("kind, msg", [("size", "vocabulary size differs: 384 vs 400"),
                                       ("text", "token 100 differs")])
def test_vocabulary_mismatch_is_refused(bundle, odd_models, kind, msg):
    hf, gguf = odd_models[kind]
    for e, a in ((open_llama(bundle / "gguf/expert-F32.gguf"), open_llama(gguf)),
                 (open_mlx(bundle / "mlx/expert"), open_mlx(hf))):
        with pytest.raises(MismatchError, match=msg):
            check_same_vocab(e, a)
        check_same_vocab(e, e)
        e.close()
        a.close()


# ----------------------------------------------------------------------------------------------
# MLX: the output layer on the last position only
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,dtype,tie,bits", [("llama", "float32", False, None), ("qwen2", "float32", True, None),
                                                 ("qwen3", "bfloat16", True, None), ("llama", "float32", False, 4),
                                                 ("qwen2", "float32", True, 8)])
def test_mlx_forward_computes_the_head_on_the_last_position_only(tmp_path, monkeypatch, arch, dtype, tie, bits):
    """A prefill's logits are the last position's of the whole forward (bit-equal on MLX's CPU), untied
    lm_head and tied embeddings, plain and quantized; the output layer sees one row, not all T."""
    import mlx.core as mx

    import epicode_edge.backends.mlx as mlx_backend
    from epicode_edge.converters.mlx import export_mlx
    from factory import make_hf_model

    path = export_mlx(make_hf_model(tmp_path / "hf", arch=arch, dtype=dtype, tie=tie), tmp_path / "mlx", bits=bits)
    m = open_mlx(path)
    head = mlx_backend.last_position_head(m._model)
    assert head is not None
    rows = []
    monkeypatch.setattr(m, "_head", lambda h: rows.append(h.shape) or head(h))
    ids = [3, 17, 250, 9, 41, 77, 5]
    got = [m.prefill(ids).copy(), m.step(12).copy()]
    assert rows == [(1, 1, m._model.args.hidden_size)] * 2
    m.truncate(0)
    monkeypatch.setattr(m, "_head", None)  # the whole forward, sliced afterwards
    want = [m.prefill(ids).copy(), m.step(12).copy()]
    for a, b in zip(got, want):
        if mx.default_device() == mx.cpu:
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    m.close()


# ----------------------------------------------------------------------------------------------
# rows: the logits of some token ids only (the amateur's candidates)
# ----------------------------------------------------------------------------------------------


def test_rows_are_those_logits_of_the_whole_vector_and_keep_the_cache(expert):
    """prefill/step with rows give the whole vector's values at those ids, in their order (bit-equal: the
    same forward on llama.cpp, the gathered rows of the output layer on MLX's CPU); empty rows still cache
    the tokens; ids outside the vocabulary are refused before the engine runs."""
    import mlx.core as mx

    ids, rows = [0, 5, 6, 40], np.array([300, 7, 7, 0, 383])
    expert.truncate(0)
    whole = [expert.prefill(ids).copy(), expert.step(9).copy(), expert.step(10).copy()]
    expert.truncate(0)
    got = [expert.prefill(ids, rows=rows), expert.step(9, rows=np.zeros(0, dtype=np.int64)), expert.step(10, rows=rows)]
    assert expert.tokens == ids + [9, 10] and got[1].shape == (0,)
    for a, b in ((got[0], whole[0][rows]), (got[2], whole[2][rows])):
        assert a.shape == (5,) and a.dtype == np.float32
        if expert.name == "llama.cpp" or mx.default_device() == mx.cpu:
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert expert.partial_head == (expert.name == "mlx")
    for bad in ([384], [-1]):
        with pytest.raises(ParameterError, match="rows must be token ids"):
            expert.step(11, rows=np.array(bad))
    assert expert.n_past == 6


@pytest.mark.parametrize("arch,dtype,tie,bits", [("llama", "float32", False, None), ("qwen2", "float32", True, None),
                                                 ("qwen3", "bfloat16", True, None), ("llama", "float32", False, 4),
                                                 ("qwen2", "float32", True, 8)])
def test_mlx_rows_compute_only_those_rows_of_the_output_layer(tmp_path, monkeypatch, arch, dtype, tie, bits):
    """MLX with rows: the output layer's product runs on K gathered rows, never the vocabulary's (the whole
    layer is not called), untied and tied, float, bf16 and quantized; the values are the whole layer's."""
    import mlx.core as mx

    import epicode_edge.backends.mlx as mlx_backend
    from epicode_edge.converters.mlx import export_mlx
    from factory import make_hf_model

    path = export_mlx(make_hf_model(tmp_path / "hf", arch=arch, dtype=dtype, tie=tie), tmp_path / "mlx", bits=bits)
    m = open_mlx(path)
    assert m.partial_head
    ids, rows = [3, 17, 250, 9, 41], np.array([5, 99, 383, 12])
    want = [m.prefill(ids)[rows], m.step(12)[rows]]
    m.truncate(0)
    seen = []
    real = mlx_backend.head_rows
    monkeypatch.setattr(m, "_head", lambda h: pytest.fail("the whole output layer ran"))
    monkeypatch.setattr(mlx_backend, "head_rows", lambda layer, h, r: seen.append(r.shape) or real(layer, h, r))
    got = [m.prefill(ids, rows=rows), m.step(12, rows=rows)]
    assert seen == [(4,), (4,)]
    for a, b in zip(got, want):
        if mx.default_device() == mx.cpu:
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    m.close()
