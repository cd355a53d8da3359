"""llama.cpp with several sequences in one context: one `llama_decode` feeds tokens of many requests.

    mb = MultiSeqLlamaCpp.from_backend(runtime.expert, n_slots=8)   # shares the loaded model's weights
    logits = mb.decode([(0, prompt_ids), (3, [token])])             # [(V,), (V,)] float32 copies
    mb.clear(0)                                                       # slot 0 free for a new request

The context is made with n_seq_max = n_slots and a KV cache split per sequence (kv_unified = false), so
each slot has n_ctx positions of its own and attends only to them. Everything else (threads, KV type, flash
attention) is copied from the single-sequence context of the LlamaCppBackend it comes from, so the logits of
a slot are those of that backend for the same tokens (up to float rounding of the batched kernels).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from ..errors import BackendError, ContextFullError, ParameterError
from .base import Counters


class MultiSeqLlamaCpp:
    """n_slots independent KV sequences over one llama.cpp model; decode() batches their tokens."""

    name = "llama.cpp"

    def __init__(self, lib, model, params, *, n_slots: int, n_ctx: int, path, vocab_size: int):
        if not isinstance(n_slots, int) or n_slots < 1:
            raise ParameterError(f"n_slots must be an integer >= 1, got {n_slots!r}")
        self._lib, self.path, self.vocab_size, self.n_slots = lib, path, vocab_size, n_slots
        p = params  # a copy of the single-sequence context's parameters
        p.n_seq_max = n_slots
        p.kv_unified = False
        p.n_ctx = n_ctx * n_slots
        p.n_batch = p.n_ubatch = max(int(p.n_batch), n_slots)
        self._ctx = lib.llama_init_from_model(model, p)
        if not self._ctx:
            raise BackendError(f"{path}: llama.cpp cannot make a context with {n_slots} sequences "
                               f"of {n_ctx} tokens")
        self.n_ctx = int(lib.llama_n_ctx_seq(self._ctx))  # positions per slot
        self._n_batch = int(lib.llama_n_batch(self._ctx))
        self._n_ubatch = int(lib.llama_n_ubatch(self._ctx))
        self._mem = lib.llama_get_memory(self._ctx)
        self._batch = lib.llama_batch_init(self._n_batch, 0, 1)
        self._tokens: list[list[int]] = [[] for _ in range(n_slots)]
        self.counters = Counters()

    @classmethod
    def from_backend(cls, backend, n_slots: int, n_ctx: int | None = None) -> "MultiSeqLlamaCpp":
        """Share the model of a LlamaCppBackend (no second copy of the weights); n_ctx per slot defaults
        to the backend's."""
        llm = backend._llm
        params = type(llm.context_params).from_buffer_copy(llm.context_params)
        return cls(backend._lib, llm._model.model, params, n_slots=n_slots, n_ctx=n_ctx or backend.n_ctx,
                   path=backend.path, vocab_size=backend.vocab_size)

    # -- state -------------------------------------------------------------------------------------
    def n_past(self, slot: int) -> int:
        return len(self._tokens[slot])

    def tokens(self, slot: int) -> list[int]:
        return list(self._tokens[slot])

    def truncate(self, slot: int, n: int = 0) -> None:
        """Keep the first n positions of a slot (0: the slot is empty, free for a new request)."""
        if not 0 <= n <= self.n_past(slot):
            raise ParameterError(f"{self.path.name}: cannot truncate slot {slot} to {n} of {self.n_past(slot)}")
        if n < self.n_past(slot):
            self._lib.llama_memory_seq_rm(self._mem, slot, n, -1)
            del self._tokens[slot][n:]
            self.counters.truncations += 1

    def clear(self, slot: int) -> None:
        self.truncate(slot, 0)

    # -- forward -----------------------------------------------------------------------------------
    def decode(self, entries: Sequence[tuple[int, Sequence[int]]]) -> list[np.ndarray]:
        """Feed each (slot, ids) after that slot's cached positions; return the logits (V,) of each entry's
        last token, in entry order.

        Entries of equal length go through one llama_decode together (as many as fit a ubatch whole), so
        that llama.cpp never splits one sequence's tokens differently from a single-sequence context: its
        ubatches hold the same number of tokens of every sequence, and a prefill chunked otherwise rounds
        differently (enough to flip a greedy pick now and then).
        """
        entries = [(int(s), [int(t) for t in ids]) for s, ids in entries]
        self._check(entries)
        out: list[np.ndarray | None] = [None] * len(entries)
        try:
            for group in self._groups(entries):
                rows = [(s, t, self.n_past(s) + i, i == len(ids) - 1)
                        for j in group for s, ids in [entries[j]] for i, t in enumerate(ids)]
                logits = []
                for start in range(0, len(rows), self._n_batch):  # only a single long prompt spans chunks
                    logits += self._decode_chunk(rows[start:start + self._n_batch])
                for j, x in zip(group, logits):
                    out[j] = x
                for j in group:
                    s, ids = entries[j]
                    self._tokens[s].extend(ids)
        except BaseException:  # a failed decode: the cache keeps only what was recorded
            for s, _ in entries:
                self._lib.llama_memory_seq_rm(self._mem, s, self.n_past(s), -1)
            raise
        self.counters.prefill_tokens += sum(len(ids) for _, ids in entries if len(ids) > 1)
        self.counters.prefill_calls += sum(len(ids) > 1 for _, ids in entries)
        self.counters.step_calls += sum(len(ids) == 1 for _, ids in entries)
        return out

    def _check(self, entries) -> None:
        seen = set()
        for s, ids in entries:
            if not 0 <= s < self.n_slots or s in seen or not ids:
                raise ParameterError(f"decode: bad entry for slot {s} (unknown, repeated or empty)")
            seen.add(s)
            if self.n_past(s) + len(ids) > self.n_ctx:
                raise ContextFullError(f"{self.path.name}: slot {s}: {self.n_past(s)} cached + {len(ids)} new "
                                       f"tokens exceed the context of {self.n_ctx} (raise n_ctx)")

    def _groups(self, entries) -> list[list[int]]:
        """Entry indices grouped by length, each group small enough to be one ubatch."""
        by_len: dict[int, list[int]] = {}
        for j, (_, ids) in enumerate(entries):
            by_len.setdefault(len(ids), []).append(j)
        groups = []
        for n, idx in by_len.items():
            per = max(1, self._n_ubatch // n)
            groups += [idx[k:k + per] for k in range(0, len(idx), per)]
        return groups

    def _decode_chunk(self, chunk: list[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        """chunk: (slot, token, position, wants logits) rows -> logits of the rows that want them."""
        b, lib = self._batch, self._lib
        for i, (s, t, pos, last) in enumerate(chunk):
            b.token[i] = t
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = s
            b.logits[i] = last
        b.n_tokens = len(chunk)
        t0 = time.perf_counter()
        rc = lib.llama_decode(self._ctx, b)
        self.counters.forward_seconds += time.perf_counter() - t0
        if rc != 0:
            raise BackendError(f"{self.path}: llama_decode of {len(chunk)} tokens failed with code {rc}")
        V = self.vocab_size
        return [np.ctypeslib.as_array(lib.llama_get_logits_ith(self._ctx, i), shape=(V,)).copy()  # (V,)
                for i, row in enumerate(chunk) if row[3]]

    # -- lifetime ----------------------------------------------------------------------------------
    def close(self) -> None:
        ctx, self._ctx = getattr(self, "_ctx", None), None
        if ctx:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(ctx)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
