"""MLX with several sequences: one batched forward feeds one token to each of many requests.

    ms = runtime.expert.multiseq(n_slots=8)     # an MLXBackend's batched form: the same mlx_lm model object
    logits = ms.decode([(0, prompt_ids), (3, [token]), (5, [token])])

Each slot owns an mlx_lm KV cache (one KVCache per layer). A prompt or a catch-up of several tokens runs
alone on its slot's cache, exactly as the single-sequence MLXBackend does. Single tokens of several slots run
as one forward of shape (B, 1) over a BatchKVCache (mlx_lm's left-padded batch cache, as its
BatchGenerator uses): the slots' caches are merged into it once and it is kept while the same slots keep
stepping together; it is split back into per-slot caches only when the set of stepping slots changes.
"""

from __future__ import annotations

import time

import numpy as np

from ..errors import BackendError, UnsupportedError
from .multiseq import MultiSeqBase

PREFILL_CHUNK = 512  # as backends/mlx.py


class MultiSeqMLX(MultiSeqBase):
    name = "mlx"

    def __init__(self, model, *, n_slots: int, n_ctx: int, path, vocab_size: int, last_logits, head=None):
        import mlx.core as mx
        from mlx_lm.models import cache as mlx_cache

        super().__init__(path, n_slots=n_slots, n_ctx=n_ctx, vocab_size=vocab_size, max_group_tokens=1 << 30)
        self._mx, self._cache_mod, self._model = mx, mlx_cache, model
        self._last_logits = last_logits  # MLXBackend's: (tokens (1, T), cache) -> logits (V,) of the last
        self._head = head  # MLXBackend's: (layer, rows_of) for a model with a row-wise output layer, else None
        self._caches = [mlx_cache.make_prompt_cache(model) for _ in range(n_slots)]  # per slot, per layer
        if not all(type(c) is mlx_cache.KVCache for c in self._caches[0]):
            raise UnsupportedError(f"{path}: batched decoding on MLX needs plain KV caches (this model uses "
                                   f"{type(self._caches[0][0]).__name__})")
        self._batch_slots: tuple[int, ...] = ()
        self._batch = None  # per layer BatchKVCache over _batch_slots
        self.batched_forwards = 0  # forwards of shape (B > 1, 1)

    # -- engine hooks ------------------------------------------------------------------------------
    def _decode_group(self, slots: list[int], ids: list[list[int]], rows: list) -> list[np.ndarray]:
        t0 = time.perf_counter()
        try:
            if len(slots) > 1 and len(ids[0]) == 1:
                out = self._step_batch(slots, [t[0] for t in ids], rows)
            else:
                out = [self._forward_one(s, toks, r) for s, toks, r in zip(slots, ids, rows)]
        except (ValueError, RuntimeError) as e:
            raise BackendError(f"{self.path}: MLX forward failed ({' '.join(str(e).split())})") from None
        self.counters.forward_seconds += time.perf_counter() - t0
        return out

    def _forward_one(self, slot: int, ids: list[int], rows=None) -> np.ndarray:
        """One sequence on its own cache, as MLXBackend._forward (_forward_rows with rows)."""
        mx = self._mx
        self._unbatch(slot)
        cache = self._caches[slot]
        for i in range(0, len(ids) - PREFILL_CHUNK, PREFILL_CHUNK):  # all chunks but the last
            self._model(mx.array(ids[i:i + PREFILL_CHUNK])[None], cache=cache)
            mx.eval([c.state for c in cache])
        last = mx.array(ids[(len(ids) - 1) // PREFILL_CHUNK * PREFILL_CHUNK:])[None]  # (1, T)
        if rows is None or self._head is None:
            x = np.array(self._last_logits(last, cache).astype(mx.float32))  # (V,)
            return x if rows is None else x[rows]
        h = self._model.model(last, cache=cache)[:, -1:, :]  # (1, 1, D)
        return self._rows_of(h, [rows], cache)[0]

    def _rows_of(self, h, rows, cache) -> list[np.ndarray]:
        """Per batch row b of h (B, 1, D): the output layer on token ids rows (K,) only, or none (empty)."""
        mx = self._mx
        layer, head_rows = self._head
        ys = [head_rows(layer, h[b:b + 1], mx.array(r)) if r.size else None for b, r in enumerate(rows)]
        mx.eval([y for y in ys if y is not None], [c.state for c in cache])
        return [np.array(y[0, -1].astype(mx.float32)) if y is not None else np.zeros(0, dtype=np.float32)
                for y in ys]

    def _step_batch(self, slots: list[int], tokens: list[int], rows: list) -> list[np.ndarray]:
        """One token for each slot in one forward of shape (B, 1)."""
        mx = self._mx
        if tuple(slots) != self._batch_slots:
            self._unbatch()
            n_layers = len(self._caches[slots[0]])
            self._batch = [self._cache_mod.BatchKVCache.merge([self._caches[s][i] for s in slots])
                           for i in range(n_layers)]
            self._batch_slots = tuple(slots)
        self.batched_forwards += 1
        if self._head is not None and all(r is not None for r in rows):  # rows only: no (B, V) product
            h = self._model.model(mx.array(tokens)[:, None], cache=self._batch)[:, -1:, :]  # (B, 1, D)
            return self._rows_of(h, rows, self._batch)
        logits = self._model(mx.array(tokens)[:, None], cache=self._batch)[:, -1]  # (B, V)
        mx.eval(logits, [c.state for c in self._batch])
        x = np.array(logits.astype(mx.float32))  # (B, V)
        return [x[b] if r is None else x[b][r] for b, r in enumerate(rows)]

    def _unbatch(self, slot: int | None = None) -> None:
        """Split the batch cache back into per-slot caches (when `slot` is in it, or always for None)."""
        if self._batch is None or (slot is not None and slot not in self._batch_slots):
            return
        for b, s in enumerate(self._batch_slots):
            self._caches[s] = [layer.extract(b) for layer in self._batch]
        self._batch, self._batch_slots = None, ()

    def _trim(self, slot: int, n: int) -> None:
        self._unbatch(slot)
        cache = self._caches[slot]
        held = cache[0].offset
        if held > n:
            self._cache_mod.trim_prompt_cache(cache, held - n)

    def close(self) -> None:
        self._batch, self._caches = None, []
