"""Engine helpers shared by the GGUF / MLX export tests: last-token logits from llama.cpp and mlx_lm."""

from __future__ import annotations

import numpy as np

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is 17 + 25? Answer:",
    "Café crème, 東京 😀 <|eot_id|> done",
]


def llama_model(path, n_ctx: int = 128, vocab_only: bool = False):
    """A llama.cpp model with an F32 KV cache (the default F16 cache alone costs ~1e-2 on these logits)."""
    from llama_cpp import GGML_TYPE_F32

    from epicode_edge.backends.cpu_kernels import open_llama

    return open_llama(path, n_ctx=n_ctx, logits_all=False, verbose=False, vocab_only=vocab_only,
                 type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, n_threads=2)


def llama_last_logits(llm, ids: list[int]) -> np.ndarray:
    """(V,) float32 logits of the last position after evaluating ids from an empty cache."""
    import llama_cpp

    llm.reset()
    llm.eval(ids)
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def mlx_last_logits(model, ids: list[int]) -> np.ndarray:
    import mlx.core as mx

    out = model(mx.array([ids]))[0, -1].astype(mx.float32)  # (V,)
    return np.array(out)


def mlx_load_f32(path):
    """mlx_lm model and tokenizer, weights upcast to float32 (so f16/bf16 sources compute like llama.cpp F32)."""
    import mlx.core as mx
    import mlx_lm

    model, tok = mlx_lm.load(str(path))
    model.set_dtype(mx.float32)
    return model, tok


def convert_in_pieces_and_whole(ft, inf, out, monkeypatch, **kw):
    """convert() of GGUF inputs twice: in pieces of 3 rows (the whole-tensor write never called), made by one
    thread and encoded by three, then with the whole-tensor path forced. Returns the (pieces, whole) bundles,
    to be compared byte for byte."""
    import epicode_edge.converters.convert as cv
    from epicode_edge.converters.checkpoint import open_checkpoint

    tensors = open_checkpoint(ft).tensors
    cols = tensors["token_embd.weight"].shape[-1]
    assert any(t.shape[0] % 3 for t in tensors.values() if len(t.shape) == 2)  # pieces that cut tensors unevenly
    written = []
    with monkeypatch.context() as m:
        m.setattr(cv, "PIECE_ELEMENTS", 3 * cols)
        m.setattr(cv, "_cores", lambda: 4)  # the read-ahead thread and 3 encoder threads, whatever this machine has
        m.setattr(cv._Sinks, "write", lambda self, t: written.append(t.name))  # pieces never use it
        pieces = cv.convert(ft, inf, out / "pieces", **kw)
    assert written == []
    with monkeypatch.context() as m:
        m.setattr(cv._Sinks, "take_rows", lambda self: False)
        whole = cv.convert(ft, inf, out / "whole", **kw)
    return pieces, whole
