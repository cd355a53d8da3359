"""MLX through mlx_lm: one MLX (or plain HF safetensors) folder, its model forward and KV cache.

`mlx_lm.load` gives the model and a TokenizerWrapper (the HF tokenizer); the cache comes from
`make_prompt_cache` and is trimmed with `trim_prompt_cache`. Logits of the last position are converted to a
float32 numpy vector (MLX has no zero-copy view of a lazy array; the copy is one vector per forward).

The output layer runs on the last position only (`last_position_head`), and with `rows` (the amateur's
candidates) on those token ids only (`head_rows`: the K rows of the weight gathered, then the same product;
partial_head): on SmolLM2 the full layer is 28% of a step's time on MLX's CPU backend.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import BackendError, InputError, UnsupportedError, require
from .base import BaseBackend, end_of_turn_ids

PREFILL_CHUNK = 512  # tokens per forward during a long prefill (bounds the attention scratch memory)


class MLXBackend(BaseBackend):
    name = "mlx"

    def __init__(self, path, n_ctx: int = 2048):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise InputError(f"{path}: not an MLX/HF model folder (no config.json)")
        require("mlx_lm", "the MLX backend")
        import mlx.core as mx
        from mlx_lm import load
        from mlx_lm.models import cache as mlx_cache

        self._mx, self._cache_mod = mx, mlx_cache
        try:
            self._model, self._tok = load(str(path))
        except (ValueError, OSError, KeyError, FileNotFoundError) as e:
            raise BackendError(f"{path}: mlx_lm cannot load the model ({' '.join(str(e).split())})") from None
        super().__init__(path, n_ctx)
        self._cache = mlx_cache.make_prompt_cache(self._model)
        self._head = last_position_head(self._model)
        self._head_layer = head_layer(self._model) if self._head is not None else None
        self.partial_head = self._head_layer is not None and can_take_rows(self._head_layer)
        self.vocab_size = _vocab_size(path, self._model)
        self._hf = self._tok._tokenizer
        self._texts: list[str] | None = None
        self._bytes = _token_bytes_table(path, self._hf, self.vocab_size)
        self._read_metadata()

    def _read_metadata(self) -> None:
        hf = self._hf
        self.bos_id = hf.bos_token_id
        probe = hf.encode("a", add_special_tokens=True)
        self.add_bos = self.bos_id is not None and len(probe) > 0 and probe[0] == self.bos_id
        vocab = hf.get_vocab()
        eos = set(self._tok.eos_token_ids) | end_of_turn_ids(vocab.get)
        self.eos_ids = frozenset(i for i in eos if i < self.vocab_size)
        self.chat_template = hf.chat_template if isinstance(hf.chat_template, str) else None
        self.bos_token = hf.bos_token
        self.eos_token = hf.eos_token

    # -- tokens ------------------------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = True, add_bos: bool | None = None) -> list[int]:
        """As the HF tokenizer does by default (add_bos=None: add_special_tokens=True)."""
        kw = {} if special else {"split_special_tokens": True}
        if add_bos is None:
            return list(self._hf.encode(text, add_special_tokens=True, **kw))
        ids = list(self._hf.encode(text, add_special_tokens=False, **kw))
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def detokenize(self, ids: Sequence[int]) -> bytes:
        return b"".join(self._bytes[i] for i in ids)

    def token_texts(self) -> list[str]:
        if self._texts is None:
            n = len(self._hf)
            texts = self._hf.convert_ids_to_tokens(list(range(min(n, self.vocab_size))))
            self._texts = [t or "" for t in texts] + [""] * max(0, self.vocab_size - n)
        return self._texts

    # -- forward -----------------------------------------------------------------------------------
    def multiseq(self, n_slots: int, n_ctx: int | None = None):
        """This model with n_slots KV sequences decoded together (backends/mlx_batch.py), over the same
        mlx_lm model object; n_ctx per slot defaults to this backend's."""
        from .mlx_batch import MultiSeqMLX

        return MultiSeqMLX(self._model, n_slots=n_slots, n_ctx=n_ctx or self.n_ctx, path=self.path,
                           vocab_size=self.vocab_size, last_logits=self._last_logits,
                           head=(self._head_layer, head_rows) if self.partial_head else None)

    def _forward(self, ids: list[int]) -> np.ndarray:
        last = self._feed_but_last_chunk(ids)
        return np.array(self._last_logits(last, self._cache).astype(self._mx.float32))

    def _forward_rows(self, ids: list[int], rows: np.ndarray) -> np.ndarray:
        if not self.partial_head:
            return self._forward(ids)[rows]
        mx = self._mx
        h = self._model.model(self._feed_but_last_chunk(ids), cache=self._cache)[:, -1:, :]  # (1, 1, D)
        if rows.size == 0:  # logits not read: no output layer, only the cache
            mx.eval([c.state for c in self._cache])
            return np.zeros(0, dtype=np.float32)
        return np.array(head_rows(self._head_layer, h, mx.array(rows))[0, -1].astype(mx.float32))

    def _feed_but_last_chunk(self, ids: list[int]):
        """Feed all PREFILL_CHUNK-token chunks of ids but the last; the last chunk as a (1, T) array."""
        mx = self._mx
        for i in range(0, len(ids) - PREFILL_CHUNK, PREFILL_CHUNK):
            self._model(mx.array(ids[i:i + PREFILL_CHUNK])[None], cache=self._cache)
            mx.eval([c.state for c in self._cache])
        return mx.array(ids[(len(ids) - 1) // PREFILL_CHUNK * PREFILL_CHUNK:])[None]

    def _last_logits(self, tokens, cache):
        """Logits (V,) of the last of tokens (1, T) fed on cache; the output layer on that position only
        where the model allows it (last_position_head), not on all T."""
        if self._head is None:
            return self._model(tokens, cache=cache)[0, -1]
        return self._head(self._model.model(tokens, cache=cache)[:, -1:, :])[0, -1]

    def _trim(self, n: int) -> None:
        held = self._cache[0].offset if self._cache else 0
        if held <= n:
            return
        if not self._cache_mod.can_trim_prompt_cache(self._cache):
            raise UnsupportedError(f"{self.path}: this model's MLX cache cannot drop positions")
        self._cache_mod.trim_prompt_cache(self._cache, held - n)


# mlx_lm model modules whose Model.__call__ is `head(self.model(inputs, cache))`, the head being lm_head or,
# with tie_word_embeddings, embed_tokens.as_linear (read off mlx_lm's llama.py, qwen2.py, qwen3.py)
_PLAIN_HEAD_MODULES = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3")


def last_position_head(model):
    """The output layer of a model whose forward is `head(model.model(...))`, or None (then the whole forward
    is called). A forward of T tokens then computes logits for its last position only, as mlx_lm's generate
    does (it feeds the prompt's last token alone), not for all T: a T x vocabulary product and its memory
    (e.g. 500 x 49152 float32 = 98 MB) saved per prefill. The logits are the same values (the head is the
    same layer on the same row)."""
    if type(model).__module__ not in _PLAIN_HEAD_MODULES or not hasattr(model, "model"):
        return None
    args = getattr(model, "args", None)
    if getattr(args, "tie_word_embeddings", False):
        return model.model.embed_tokens.as_linear
    return getattr(model, "lm_head", None)


def head_layer(model):
    """The module whose weight rows are the output layer's (embed_tokens when tied, else lm_head)."""
    args = getattr(model, "args", None)
    if getattr(args, "tie_word_embeddings", False):
        return model.model.embed_tokens
    return getattr(model, "lm_head", None)


def can_take_rows(layer) -> bool:
    """Whether head_rows handles this output layer: float Linear/Embedding, or affine-quantized ones."""
    import mlx.nn as nn

    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return getattr(layer, "mode", "affine") == "affine" and layer.get("biases") is not None
    return type(layer) in (nn.Linear, nn.Embedding)


def head_rows(layer, h, rows):
    """The output layer's logits for token ids rows (K,) only: h (1, 1, D) -> (1, 1, K). The K rows of the
    weight (and of the scales and biases of a quantized one) are gathered and multiplied as the whole layer
    multiplies all of them (same values on MLX's CPU backend: test_backends)."""
    import mlx.core as mx
    import mlx.nn as nn

    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        y = mx.quantized_matmul(h, layer.weight[rows], layer.scales[rows], layer.biases[rows], transpose=True,
                                group_size=layer.group_size, bits=layer.bits)
    else:
        y = h @ layer.weight[rows].T
    if isinstance(layer, (nn.Linear, nn.QuantizedLinear)) and "bias" in layer:
        y = y + layer.bias[rows]
    return y


def _vocab_size(path: Path, model) -> int:
    cfg = json.loads((path / "config.json").read_text())
    v = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")
    if not v:
        raise BackendError(f"{path / 'config.json'}: no vocab_size")
    return int(v)


def _gpt2_byte_decoder() -> dict[str, int]:
    """The GPT-2 byte-level alphabet: printable char -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _decoder_kind(path: Path) -> str:
    """"bytelevel", "spm" (metaspace / byte fallback) or "other", from tokenizer.json's decoder."""
    f = path / "tokenizer.json"
    if not f.is_file():
        return "other"
    dec = json.loads(f.read_text(encoding="utf-8")).get("decoder") or {}
    parts = dec.get("decoders", [dec]) if dec.get("type") == "Sequence" else [dec]
    types = {p.get("type") for p in parts}
    if "ByteLevel" in types:
        return "bytelevel"
    if types & {"ByteFallback", "Metaspace"} or any(p.get("pattern", {}).get("String") == "▁" for p in parts):
        return "spm"
    return "other"


def _token_bytes_table(path: Path, hf, vocab_size: int) -> list[bytes]:
    """bytes of every token id as llama.cpp's token_to_piece(special=False) gives them: special (control)
    tokens render as b"", byte-level BPE and SentencePiece pieces as their raw bytes."""
    kind = _decoder_kind(path)
    n = min(len(hf), vocab_size)
    texts = hf.convert_ids_to_tokens(list(range(n)))
    special = {i for i, t in hf.added_tokens_decoder.items() if t.special}
    added = {i: t.content for i, t in hf.added_tokens_decoder.items() if not t.special}
    byte_dec = _gpt2_byte_decoder() if kind == "bytelevel" else None
    out = []
    for i, t in enumerate(texts):
        if i in special or t is None:
            out.append(b"")
        elif i in added:
            out.append(added[i].encode("utf-8"))
        elif byte_dec is not None:
            out.append(bytes(byte_dec[c] for c in t) if all(c in byte_dec for c in t) else t.encode("utf-8"))
        elif kind == "spm":
            out.append(_spm_piece(t))
        else:
            out.append(hf.decode([i]).encode("utf-8"))
    return out + [b""] * (vocab_size - n)


def _spm_piece(t: str) -> bytes:
    if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
        return bytes([int(t[3:5], 16)])
    return t.replace("▁", " ").encode("utf-8")
