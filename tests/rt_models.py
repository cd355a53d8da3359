"""Models the runtime tests share, built once per test session (tiny: a few hundred KB each).

    pair_dir(tmp_path_factory)    finetuned + inferior HF folders (tiny llama, 384-token vocab)
    bundle_dir(tmp_path_factory)  convert() of that pair: GGUF F32 + Q8_0 and MLX folders, mu = 0.5
    f32_runtime(tmp_path_factory) its F32 models on llama.cpp, F32 KV cache, n_ctx 256
    ScriptBackend                 a numpy "engine" whose logits are a given function of the token history,
                                  for loop logic that random models cannot steer (UTF-8 splits, stop strings)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import pytest

from epicode_edge.backends.base import BaseBackend

_BUILT: dict[str, Path] = {}

N_THREADS = 1  # the CI machine has 2 cores shared with other jobs: one thread avoids spin-wait stalls


def pair_dir(tmp_path_factory) -> Path:
    if "pair" not in _BUILT:
        from factory import make_pair

        root = tmp_path_factory.mktemp("rt_pair")
        make_pair(root, arch="llama", seed=7, delta=0.3)
        _BUILT["pair"] = root
    return _BUILT["pair"]


def bundle_dir(tmp_path_factory) -> Path:
    if "bundle" not in _BUILT:
        from epicode_edge.converters.convert import convert

        pair = pair_dir(tmp_path_factory)
        out = tmp_path_factory.mktemp("rt_bundle") / "bundle"
        convert(pair / "finetuned", pair / "inferior", out, mu=0.5, to=["gguf", "mlx"], quant=["F32", "Q8_0"])
        _BUILT["bundle"] = out
    return _BUILT["bundle"]


def f32_runtime(tmp_path_factory):
    """The shared bundle's F32 models on llama.cpp with an F32 KV cache (for exact checks), n_ctx 256."""
    from epicode_edge.runtime import load

    return load(bundle_dir(tmp_path_factory), quant="F32", n_ctx=256, n_threads=N_THREADS, kv_type="f32")


# ----------------------------------------------------------------------------------------------
# a scripted backend for loop logic
# ----------------------------------------------------------------------------------------------

EOS = 256  # byte tokens 0..255, then EOS, then two more specials
VOCAB = 259


class ScriptBackend(BaseBackend):
    """Token i < 256 is the byte i; 256 = EOS. logits = fn(history) (V,)."""

    name = "script"

    def __init__(self, fn, n_ctx: int = 512, path: str = "script"):
        super().__init__(path, n_ctx)
        self.fn = fn
        self.vocab_size = VOCAB
        self.bos_id = None
        self.eos_ids = frozenset({EOS})
        self.add_bos = False
        self.chat_template = None
        self.bos_token = self.eos_token = None

    def tokenize(self, text, special=True, add_bos=None):
        return list(text.encode("utf-8"))

    def token_bytes(self, i):
        return bytes([i]) if i < 256 else b""

    def detokenize(self, ids):
        return b"".join(self.token_bytes(i) for i in ids)

    def token_texts(self):
        return [repr(bytes([i])) for i in range(256)] + ["<eos>", "<a>", "<b>"]

    def _forward(self, ids):
        seq = self.tokens + ids
        return np.asarray(self.fn(seq), dtype=np.float32)

    def _trim(self, n):
        pass


def spell(text, prompt_len: int, then_eos: bool = True, margin: float = 10.0):
    """A script that answers a prompt of prompt_len tokens with the bytes of text, then EOS (or byte 0)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)

    def fn(seq):
        k = len(seq) - prompt_len  # index of the byte to produce next
        x = np.zeros(VOCAB, dtype=np.float32)
        x[data[k] if k < len(data) else (EOS if then_eos else 0)] = margin
        return x

    return fn


# Fixtures shared by the runtime test modules (import them: `from rt_models import bundle, rt`).
@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return bundle_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def rt(bundle):
    from epicode_edge.runtime import load

    r = load(bundle, quant="F32", n_threads=N_THREADS)
    yield r
    r.close()
