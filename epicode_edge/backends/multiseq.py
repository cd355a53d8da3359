"""Multi-sequence engines: n_slots KV sequences of one model, whose tokens are decoded together.

    logits = ms.decode([(0, prompt_ids), (3, [token]), (5, [token])])   # [(V,), (V,), (V,)] float32 copies
    ms.truncate(3, 0)                                                      # slot 3 empty again
    ms.copy_prefix(0, 3, 20)   # slot 3 holds slot 0's first 20 positions, copied (where ms.can_copy)

    ys = ms.decode(entries, rows=[ids_a, None, EMPTY])  # per entry: logits of those token ids only (K,),
                                                          # all (V,), or none (no output layer; EMPTY = 0 ids)

The bookkeeping (cached tokens per slot, context checks, counters, grouping) lives here; an engine implements
`_decode_group(slots, ids_per_slot, rows_per_slot) -> [logits]` for entries of EQUAL length, `_trim(slot, n)`
and `close()`. Rows as in backends/base.py: llama.cpp computes all logits of an output position and indexes
them, or no output position for empty rows; MLX computes only the asked rows of its output layer.
decode() hands the engine its entries grouped by length: an engine then never chunks one sequence's tokens
differently from a single-sequence context (which would round differently and can flip a greedy pick).

One-token entries (a step of every request in flight) go to the engine in one call (grouped) or one call each
(split), as StepGrouping decides: a CPU kernel for a matrix of several columns can cost more than that many
one-column calls (SmolLM2 Q8_0 on a 2-core AVX-512 EPYC, 1 thread: 4 tokens in one llama_decode 50 ms, four
calls of one 42 ms; F16: 28 ms and 54 ms; `bench/batch.py --engine-rows`), so "auto" measures both ways on the
steps it decodes and keeps the faster one per number of entries. Split entries run as a single-sequence
context runs them (one token, one output row: the same logits, bit for bit).
Engines: backends/llamacpp_batch.py (one multi-sequence llama_decode), backends/mlx_batch.py (one batched
forward with a left-padded batch KV cache).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Sequence

import numpy as np

from ..errors import ParameterError
from .base import CachedTokens, Counters, check_rows


STEP_MODES = ("auto", "grouped", "split")


class StepGrouping:
    """Whether the m one-token entries of a step go to the engine in one call or in m calls of one.

    mode "grouped" or "split" fixes it; "auto" measures: seconds per call of one entry (from split steps and
    steps of one request) against seconds per call of m entries, SAMPLES of each before it chooses; then it
    keeps the way with the lower cost per token, and every RECHECK-th step of m entries runs the other way so
    that a change of load or context length is seen. Timings are kept per key (the engine's thread counts:
    a context's threads change when the two models start or stop sharing the cores)."""

    SAMPLES = 3
    KEEP = 8  # the last KEEP timings of each way count
    RECHECK = 32

    def __init__(self, mode: str = "auto"):
        if mode not in STEP_MODES:
            raise ParameterError(f"batch_steps must be one of {', '.join(STEP_MODES)}, got {mode!r}")
        self.mode = mode
        self._one: dict = {}    # key -> deque of seconds per one-entry call
        self._many: dict = {}   # (key, m) -> deque of seconds per call of m entries
        self._count: dict = {}  # (key, m) -> steps of m entries seen

    def split(self, m: int, key=None) -> bool:
        """Whether the next step of m one-token entries should be decoded one entry per call."""
        if m < 2 or self.mode != "auto":
            return m >= 2 and self.mode == "split"
        one, many = self._one.get(key, ()), self._many.get((key, m), ())
        n = self._count[key, m] = self._count.get((key, m), 0) + 1
        if len(one) < self.SAMPLES:
            return True  # a split step gives m timings of one entry at once
        if len(many) < self.SAMPLES:
            return False
        split = self.faster_split(m, key)
        return not split if n % self.RECHECK == 0 else split

    def faster_split(self, m: int, key=None) -> bool | None:
        """Whether m calls of one entry took less time than one call of m (None: not measured yet)."""
        one, many = self._one.get(key, ()), self._many.get((key, m), ())
        if len(one) < self.SAMPLES or len(many) < self.SAMPLES:
            return None
        return m * statistics.median(one) < statistics.median(many)

    def record(self, m: int, seconds: float, key=None) -> None:
        """The time of one engine call that decoded m one-token entries."""
        d = self._one.setdefault(key, deque(maxlen=self.KEEP)) if m == 1 else \
            self._many.setdefault((key, m), deque(maxlen=self.KEEP))
        d.append(seconds)


class MultiSeqBase:
    name = "base"
    can_copy = False  # copy_prefix works (else it returns False and changes nothing)

    def __init__(self, path, *, n_slots: int, n_ctx: int, vocab_size: int, max_group_tokens: int,
                 steps: StepGrouping | None = None):
        if not isinstance(n_slots, int) or n_slots < 1:
            raise ParameterError(f"n_slots must be an integer >= 1, got {n_slots!r}")
        self.path, self.n_slots, self.n_ctx, self.vocab_size = path, n_slots, int(n_ctx), vocab_size
        self._max_group_tokens = max(1, int(max_group_tokens))  # tokens one engine call may take
        self._held = CachedTokens(path, self.n_ctx, n_slots)
        self.counters = Counters()
        # one-token entries: one call or one each (shared with the engine's other batched forms: what it
        # measured stays known)
        self.steps = steps if steps is not None else StepGrouping("grouped")

    # -- state -------------------------------------------------------------------------------------
    def n_past(self, slot: int) -> int:
        return self._held.n_past(slot)

    def tokens(self, slot: int) -> list[int]:
        return list(self._held.ids[slot])

    def shared_prefix(self, slot: int, ids: Sequence[int]) -> int:
        """How many leading positions of the slot's cache equal ids (no copy of the cache's token list)."""
        held, n = self._held.ids[slot], min(len(self._held.ids[slot]), len(ids))
        k = 0
        while k < n and held[k] == ids[k]:
            k += 1
        return k

    def truncate(self, slot: int, n: int = 0) -> None:
        """Keep the first n positions of a slot (0: the slot is empty, free for a new request)."""
        self._held.check_truncate(n, slot, f"slot {slot} ")
        if n < self.n_past(slot):
            self._trim(slot, n)
            del self._held.ids[slot][n:]
            self.counters.truncations += 1

    def clear(self, slot: int) -> None:
        self.truncate(slot, 0)

    def copy_prefix(self, src: int, dst: int, n: int) -> bool:
        """Make slot dst hold the first n positions of slot src, their KV copied rather than computed again
        (a system prompt shared by the requests of several slots): True; False where the engine cannot copy
        (dst unchanged) or could not cut the copy back to n (dst then empty)."""
        if not (0 <= src < self.n_slots and 0 <= dst < self.n_slots) or src == dst:
            raise ParameterError(f"copy_prefix: bad slots {src} -> {dst}")
        self._held.check_truncate(n, src, f"slot {src} ")
        if not self.can_copy:
            return False
        if self._copy(src, dst, n):
            self._held.ids[dst] = self._held.ids[src][:n]
            self.counters.truncations += 1
            return True
        self._trim(dst, 0)
        self._held.ids[dst] = []
        return False

    # -- forward -----------------------------------------------------------------------------------
    def decode(self, entries: Sequence[tuple[int, Sequence[int]]],
               rows: Sequence[np.ndarray | None] | None = None) -> list[np.ndarray]:
        """Feed each (slot, ids) after that slot's cached positions; return the logits (V,) of each entry's
        last token, in entry order, or with rows[j] (K,) token ids the logits of those ids only (an empty
        rows[j]: none, the entry only cached). Entries of equal length are decoded together."""
        entries = [(int(s), [int(t) for t in ids]) for s, ids in entries]
        rows = self._check_rows(rows, len(entries))
        self._check(entries)
        out: list[np.ndarray | None] = [None] * len(entries)
        for group in self._groups(entries):
            slots = [entries[j][0] for j in group]
            t0 = time.perf_counter()
            try:
                logits = self._decode_group(slots, [entries[j][1] for j in group], [rows[j] for j in group])
            except BaseException:
                for s in slots:  # the engine keeps only what was recorded
                    self._trim(s, self.n_past(s))
                raise
            if len(entries[group[0]][1]) == 1:
                self.steps.record(len(group), time.perf_counter() - t0, self._timing_key())
            for j, x in zip(group, logits):
                out[j] = x
                self._held.ids[entries[j][0]].extend(entries[j][1])
        self.counters.prefill_tokens += sum(len(ids) for _, ids in entries if len(ids) > 1)
        self.counters.prefill_calls += sum(len(ids) > 1 for _, ids in entries)
        self.counters.step_calls += sum(len(ids) == 1 for _, ids in entries)
        return out

    def _check_rows(self, rows, n: int) -> list:
        if rows is None:
            return [None] * n
        if len(rows) != n:
            raise ParameterError(f"decode: {len(rows)} rows for {n} entries")
        return [None if r is None else check_rows(r, self.vocab_size, "decode: ") for r in rows]

    def _check(self, entries) -> None:
        seen = set()
        for s, ids in entries:
            if not 0 <= s < self.n_slots or s in seen or not ids:
                raise ParameterError(f"decode: bad entry for slot {s} (unknown, repeated or empty)")
            seen.add(s)
            self._held.check_room(len(ids), s, f"slot {s}: ")

    def _groups(self, entries) -> list[list[int]]:
        """Entry indices grouped by length, each group small enough for one engine call."""
        by_len: dict[int, list[int]] = {}
        for j, (_, ids) in enumerate(entries):
            by_len.setdefault(len(ids), []).append(j)
        groups = []
        for n, idx in by_len.items():
            per = max(1, self._max_group_tokens // n)
            if n == 1 and self.steps.split(min(len(idx), per), self._timing_key()):
                per = 1
            groups += [idx[k:k + per] for k in range(0, len(idx), per)]
        return groups

    def _timing_key(self):
        """What one-token decode times depend on besides the entry count (StepGrouping): llama.cpp's threads."""
        return None

    def share_cores(self, parts: int) -> None:
        """As Backend.share_cores: 1/parts of the CPU cores when no thread count was given at load (parts=2:
        the two models' batches decoding at once); engines without thread control ignore it."""

    # -- engine hooks ------------------------------------------------------------------------------
    def _decode_group(self, slots: list[int], ids: list[list[int]],
                      rows: list[np.ndarray | None]) -> list[np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def _trim(self, slot: int, n: int) -> None:  # pragma: no cover
        raise NotImplementedError

    def _copy(self, src: int, dst: int, n: int) -> bool:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_multiseq(backend, n_slots: int, n_ctx: int | None = None) -> MultiSeqBase:
    """The multi-sequence form a single-sequence Backend makes of itself (`backend.multiseq`: its weights,
    settings and adapters are shared)."""
    make = getattr(backend, "multiseq", None)
    if make is None:
        from ..errors import UnsupportedError

        raise UnsupportedError(f"batched decoding is not available on {backend.name}")
    return make(n_slots, n_ctx)
