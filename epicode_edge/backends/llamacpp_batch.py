"""llama.cpp with several sequences in one context: one `llama_decode` feeds tokens of many requests.

    ms = runtime.expert.multiseq(n_slots=8)     # a LlamaCppBackend's batched form: shares its loaded weights
    logits = ms.decode([(0, prompt_ids), (3, [token]), (5, [token])])

The context is made with n_seq_max = n_slots and a KV cache split per sequence (kv_unified = false), so
each slot has n_ctx positions of its own and attends only to them. Everything else (threads, KV type, flash
attention, n_batch) is copied from the single-sequence context of the LlamaCppBackend it comes from, and so
are the LoRA adapters of a shared-base role (backends/llamacpp_lora.py).

Equal-length entries go through one llama_decode together, as many as fit a ubatch whole (multiseq.py):
llama.cpp splits a multi-sequence batch into ubatches holding the same number of tokens of each sequence,
so mixing a 1-token step with a 3-token catch-up would cut the catch-up into pieces, which rounds
differently from the single-sequence context.
"""

from __future__ import annotations

import ctypes
import time

import numpy as np

from ..errors import BackendError
from .llamacpp_threads import share_context_cores
from .multiseq import MultiSeqBase


def set_lora_adapters(lib, ctx, adapters: list, path) -> None:
    """Set (llama_adapter_lora pointer, scale) pairs on a context; none: leave it plain (llama.cpp must never
    get a NULL adapter)."""
    if not adapters:
        return
    n = len(adapters)
    if hasattr(lib, "llama_set_adapters_lora"):
        arr = (lib.llama_adapter_lora_p_ctypes * n)(*[p for p, _ in adapters])
        scales = (ctypes.c_float * n)(*[s for _, s in adapters])
        rc = lib.llama_set_adapters_lora(ctx, arr, n, scales)
    else:  # older llama-cpp-python: one call per adapter, each adds to the context's set
        rc = 0
        for p, s in adapters:
            rc = rc or lib.llama_set_adapter_lora(ctx, p, s)
    if rc != 0:
        raise BackendError(f"{path}: llama.cpp refused the LoRA adapters (code {rc})")


class MultiSeqLlamaCpp(MultiSeqBase):
    """n_slots independent KV sequences over one llama.cpp model."""

    name = "llama.cpp"

    def __init__(self, lib, model, params, *, n_slots: int, n_ctx: int, path, vocab_size: int,
                 adapters: list | None = None, n_threads_given: int | None = None, steps=None):
        p = params  # a copy of the single-sequence context's parameters (its load-time threads)
        p.n_seq_max = max(1, int(n_slots))
        p.kv_unified = False
        p.n_ctx = n_ctx * p.n_seq_max
        p.n_batch = p.n_ubatch = max(int(p.n_batch), p.n_seq_max)
        self._lib = lib
        self.n_threads_given = n_threads_given
        # (decode, prompt) threads as the single-sequence context has them; a step of several slots runs with
        # the decode count for both (_use_threads)
        self.threads = self._threads_at_load = (int(p.n_threads), int(p.n_threads_batch))
        self._applied = self.threads
        self._ctx = lib.llama_init_from_model(model, p)
        if not self._ctx:
            raise BackendError(f"{path}: llama.cpp cannot make a context with {n_slots} sequences "
                               f"of {n_ctx} tokens")
        try:
            set_lora_adapters(lib, self._ctx, adapters or [], path)
        except BaseException:
            lib.llama_free(self._ctx)
            raise
        self._n_batch = int(lib.llama_n_batch(self._ctx))
        super().__init__(path, n_slots=n_slots, n_ctx=int(lib.llama_n_ctx_seq(self._ctx)), vocab_size=vocab_size,
                         max_group_tokens=int(lib.llama_n_ubatch(self._ctx)), steps=steps)
        self._mem = lib.llama_get_memory(self._ctx)
        self._batch = lib.llama_batch_init(self._n_batch, 0, 1)
        # a sequence's KV copied into another (copy_prefix): attention caches only; a recurrent state cannot be
        # cut back to a prefix
        self.can_copy = not any(getattr(lib, f, lambda m: True)(model)
                                for f in ("llama_model_is_recurrent", "llama_model_is_hybrid"))

    def share_cores(self, parts: int) -> None:
        share_context_cores(self, parts)
        self._applied = None  # set again at the next call (_use_threads)

    def _use_threads(self, n_slots: int, tokens_per_slot: int) -> None:
        """Prompts (several tokens per slot): the single-sequence context's threads, the prompt count as one
        request at a time runs them. One token of each of several slots is generation, though llama.cpp counts
        the call as a batch: the decode count for it (llama-cpp-python: half the cores; all cores on a busy CPU
        leave a decode's threads waiting at barriers for siblings the OS has descheduled, bench/batch.py)."""
        want = (self.threads[0],) * 2 if n_slots > 1 and tokens_per_slot == 1 else self.threads
        if want != self._applied:
            self._lib.llama_set_n_threads(self._ctx, *want)
            self._applied = want

    def _timing_key(self):
        return self.threads

    # -- engine hooks ------------------------------------------------------------------------------
    def _decode_group(self, slots: list[int], ids: list[list[int]], rows: list) -> list[np.ndarray]:
        # an entry's last token is an output position unless its rows are empty (no output layer for it)
        self._use_threads(len(slots), len(ids[0]))  # the entries of a group are of one length (multiseq.py)
        wants = [r is None or r.size > 0 for r in rows]
        toks = [(s, t, self.n_past(s) + i, w and i == len(seq) - 1) for s, seq, w in zip(slots, ids, wants)
                for i, t in enumerate(seq)]
        out = []
        for start in range(0, len(toks), self._n_batch):  # only a single long prompt spans chunks
            out += self._decode_rows(toks[start:start + self._n_batch])
        got = iter(out)
        return [next(got) if r is None else next(got)[r] if r.size else np.zeros(0, dtype=np.float32)
                for r in rows]

    def _decode_rows(self, rows: list[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        """(slot, token, position, wants logits) rows in one llama_decode -> logits of the rows that want them."""
        b, lib = self._batch, self._lib
        for i, (s, t, pos, last) in enumerate(rows):
            b.token[i] = t
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = s
            b.logits[i] = last
        b.n_tokens = len(rows)
        t0 = time.perf_counter()
        rc = lib.llama_decode(self._ctx, b)
        self.counters.forward_seconds += time.perf_counter() - t0
        if rc != 0:
            raise BackendError(f"{self.path}: llama_decode of {len(rows)} tokens failed with code {rc}")
        V = self.vocab_size
        return [np.ctypeslib.as_array(lib.llama_get_logits_ith(self._ctx, i), shape=(V,)).copy()  # (V,)
                for i, row in enumerate(rows) if row[3]]

    def _trim(self, slot: int, n: int) -> None:
        self._lib.llama_memory_seq_rm(self._mem, slot, n, -1)

    def _copy(self, src: int, dst: int, n: int) -> bool:
        # Each slot is a KV stream of its own (kv_unified = false), and llama.cpp copies between streams only
        # whole (llama-kv-cache.cpp, seq_cp: the buffers are copied at the next decode, before its tokens are
        # placed): the whole of src, then dst cut back to n positions.
        lib, mem = self._lib, self._mem
        lib.llama_memory_seq_rm(mem, dst, -1, -1)
        lib.llama_memory_seq_cp(mem, src, dst, -1, -1)
        return bool(lib.llama_memory_seq_rm(mem, dst, n, -1))

    def close(self) -> None:
        ctx, self._ctx = getattr(self, "_ctx", None), None
        if ctx:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(ctx)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
