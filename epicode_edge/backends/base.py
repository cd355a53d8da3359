"""The Backend protocol: one engine holding one model and its KV cache (docs/design.md#the-backend-protocol).

A backend keeps the token ids it has cached (`tokens`, `n_past`). `prefill(ids)` appends ids after the cached
positions and returns the logits of the last one; `step(id)` is prefill of one token; `truncate(n)` drops
cached positions after n (chat history reuse). Logits come back as a float32 numpy vector (V,) that may be a
view into the engine's buffer: valid until the next call on that backend, so copy it to keep it.

`rows` (prefill and step): the logits of those token ids only, (K,) in their order, when the caller reads no
others (the amateur's logits of the expert's plausible candidates). Engines with `partial_head` then compute
only those rows of the output layer (MLX: K dot products instead of the vocabulary's); the others compute
all and index. An empty rows asks for no logits: a forward for the cache only, without the output layer
(llama.cpp: no output position; MLX: the head not called).

`counters` lets callers (and tests) see the work done: tokens prefilled and stepped, forward calls, seconds.
`BaseBackend` holds the bookkeeping; an engine implements `_forward(ids) -> logits` and `_trim(n)`, and may
implement `_forward_rows(ids, rows)`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from ..errors import ContextFullError, MismatchError, ParameterError

# End-of-turn / end-of-text tokens that stop generation when the vocabulary has them as single tokens, on
# every engine alike (a superset of llama.cpp's own end-of-generation list).
END_OF_TURN_TEXTS = (
    "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<EOT>", "_<EOT>", "<|EOT|>", "<｜end▁of▁sentence｜>", "<|return|>", "<|call|>", "</s>",
)


@dataclass
class Counters:
    """Work done by one backend since load (or since `reset_counters`)."""

    prefill_calls: int = 0   # prefill() calls with at least one token (each one forward call or a few chunks)
    prefill_tokens: int = 0  # tokens fed through prefill()
    step_calls: int = 0      # step() calls (one token each)
    forward_seconds: float = 0.0  # wall time inside the engine's forward passes
    truncations: int = 0     # truncate() calls that dropped positions

    @property
    def forward_calls(self) -> int:
        return self.prefill_calls + self.step_calls

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.step_calls


class ForwardCosts:
    """Measured wall time of forward calls by batch size (running means), so that callers can choose between
    one batched forward of k tokens and k single steps: on GPUs and memory-bound CPUs a small batch costs
    about one step; on some CPU kernels (e.g. llama.cpp Q8_0 on x86) two tokens cost more than two steps."""

    MAX_K = 32      # batch sizes tracked
    WEIGHT = 0.3    # of the newest sample in the running mean
    RETRY = 16      # after this many decisions against batching a size, try it once more

    def __init__(self):
        self._mean: dict[int, float] = {}
        self._declined: dict[int, int] = {}

    def record(self, n_tokens: int, seconds: float) -> None:
        if n_tokens <= self.MAX_K:
            old = self._mean.get(n_tokens)
            self._mean[n_tokens] = seconds if old is None else old + self.WEIGHT * (seconds - old)

    def seconds(self, n_tokens: int) -> float | None:
        return self._mean.get(n_tokens)

    def batch_is_cheaper(self, k: int) -> bool:
        """Whether one forward of k tokens should beat k steps: unknown sizes are tried."""
        k = min(k, self.MAX_K)
        batch, step = self._mean.get(k), self._mean.get(1)
        if batch is None or step is None or batch <= k * step:
            return True
        n = self._declined[k] = self._declined.get(k, 0) + 1
        return n % self.RETRY == 0  # now and then, measure the batch again


class CachedTokens:
    """The token ids an engine context holds in each of its KV sequences (one for a Backend, n_slots for its
    multi-sequence form), and the checks both forms make before the engine sees a call."""

    def __init__(self, path: Path, n_ctx: int, n_seq: int = 1):
        self.path, self.n_ctx = Path(path), int(n_ctx)
        self.ids: list[list[int]] = [[] for _ in range(n_seq)]

    def n_past(self, seq: int = 0) -> int:
        return len(self.ids[seq])

    def check_room(self, n_new: int, seq: int = 0, where: str = "") -> None:
        """ContextFullError when n_new more tokens do not fit the sequence's context."""
        if self.n_past(seq) + n_new > self.n_ctx:
            raise ContextFullError(f"{self.path.name}: {where}{self.n_past(seq)} cached + {n_new} new tokens exceed "
                                   f"the context of {self.n_ctx} (raise n_ctx)")

    def check_truncate(self, n: int, seq: int = 0, where: str = "") -> None:
        if not isinstance(n, int) or not 0 <= n <= self.n_past(seq):
            raise ParameterError(f"{self.path.name}: cannot truncate {where}to {n} of {self.n_past(seq)} "
                                 "cached tokens")


@runtime_checkable
class Backend(Protocol):
    """What the decoding loop and the runtime need from an engine."""

    name: str                   # "llama.cpp" | "mlx"
    path: Path
    vocab_size: int             # length of the logits vector
    bos_id: int | None
    eos_ids: frozenset          # EOS and end-of-turn ids: generation stops on them
    add_bos: bool               # whether the model's tokenizer adds BOS to a raw prompt by default
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    n_ctx: int
    counters: Counters
    costs: ForwardCosts
    concurrent: bool            # whether two backends of this engine may run forwards from two threads at once
    on_cpu: bool                # whether the forward runs on the CPU (threads matter) rather than a GPU
    n_threads_given: int | None  # the thread count asked for at load (None: the engine's default)
    partial_head: bool          # whether prefill/step with rows compute only those rows of the output layer

    @property
    def n_past(self) -> int: ...
    @property
    def tokens(self) -> list[int]: ...
    def tokenize(self, text: str, special: bool = True, add_bos: bool | None = None) -> list[int]: ...
    def detokenize(self, ids: Sequence[int]) -> bytes: ...
    def token_bytes(self, token_id: int) -> bytes: ...
    def token_texts(self) -> list[str]: ...
    def prefill(self, ids: Sequence[int], rows: np.ndarray | None = None) -> np.ndarray: ...
    def step(self, token_id: int, rows: np.ndarray | None = None) -> np.ndarray: ...
    def truncate(self, n: int) -> None: ...
    def share_cores(self, parts: int) -> None: ...
    def close(self) -> None: ...


class BaseBackend:
    """Bookkeeping shared by the engines: cached tokens, context limit, counters."""

    name = "base"
    concurrent = False  # whether two backends of this engine may run forwards from two threads at once
    on_cpu = True
    n_threads_given: int | None = None
    partial_head = False  # True where _forward_rows computes only the asked rows of the output layer

    def __init__(self, path, n_ctx: int):
        self.path = Path(path)
        self.n_ctx = int(n_ctx)
        self.counters = Counters()
        self.costs = ForwardCosts()
        self._held = CachedTokens(self.path, self.n_ctx)
        self._dirty = False  # True while a forward runs: the engine may hold more positions than the cache

    # -- cache state -------------------------------------------------------------------------------
    @property
    def n_past(self) -> int:
        return self._held.n_past()

    @property
    def tokens(self) -> list[int]:
        """The token ids whose keys/values are cached, in order (a copy)."""
        return list(self._held.ids[0])

    def reset_counters(self) -> None:
        self.counters = Counters()

    def share_cores(self, parts: int) -> None:
        """Use 1/parts of the CPU cores when the thread count was not given at load (parts=2: two models
        decoding at once); parts=1 restores the load-time counts. Engines without thread control ignore it."""

    # -- forward -----------------------------------------------------------------------------------
    def prefill(self, ids: Sequence[int], rows: np.ndarray | None = None) -> np.ndarray:
        """Feed ids after the cached positions; logits (V,) of the last one, or with rows (K,) token ids
        the logits of those ids only, (K,)."""
        ids = [int(i) for i in ids]
        if not ids:
            raise ParameterError(f"{self.path.name}: prefill needs at least one token")
        logits = self._run(ids, rows)
        self.counters.prefill_calls += 1
        self.counters.prefill_tokens += len(ids)
        return logits

    def step(self, token_id: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Feed one token; logits (V,) of it (with rows: of those token ids only, (K,))."""
        logits = self._run([int(token_id)], rows)
        self.counters.step_calls += 1
        return logits

    def _run(self, ids: list[int], rows: np.ndarray | None = None) -> np.ndarray:
        self._check_room(len(ids))
        if rows is not None:
            rows = check_rows(rows, self.vocab_size, f"{self.path.name}: ")
        if self._dirty:  # a forward was interrupted (Ctrl-C) after the engine cached it: drop those positions
            self._trim(self.n_past)
        self._dirty = True
        t = time.perf_counter()
        logits = self._forward(ids) if rows is None else self._forward_rows(ids, rows)
        dt = time.perf_counter() - t
        self.counters.forward_seconds += dt
        self.costs.record(len(ids), dt)
        self._held.ids[0].extend(ids)
        self._dirty = False
        return logits

    def truncate(self, n: int) -> None:
        """Keep the first n cached positions, drop the rest."""
        self._held.check_truncate(n)
        if n == self.n_past and not self._dirty:
            return
        self._trim(n)
        self._dirty = False
        if n < self.n_past:
            del self._held.ids[0][n:]
            self.counters.truncations += 1

    def _check_room(self, n: int) -> None:
        self._held.check_room(n)

    # -- engine hooks ------------------------------------------------------------------------------
    def _forward(self, ids: list[int]) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _forward_rows(self, ids: list[int], rows: np.ndarray) -> np.ndarray:
        """The logits (K,) of token ids rows at the last of ids: all computed, then indexed (engines with a
        partial output layer override this)."""
        return self._forward(ids)[rows]

    def _trim(self, n: int) -> None:  # pragma: no cover - abstract
        """Make the engine's cache hold exactly the first n positions (whatever it holds now)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<{type(self).__name__} {self.path} n_ctx={self.n_ctx} n_past={self.n_past}>"


def check_rows(rows, vocab_size: int, where: str = "") -> np.ndarray:
    """rows as contiguous int64 token ids (K,), or ParameterError when one is outside the vocabulary."""
    rows = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= vocab_size):
        raise ParameterError(f"{where}rows must be token ids in [0, {vocab_size}) (got {rows.min()}..{rows.max()})")
    return rows


def end_of_turn_ids(text_to_id) -> set[int]:
    """Ids of END_OF_TURN_TEXTS that the vocabulary has as single tokens. text_to_id(text) -> id or None."""
    out = set()
    for t in END_OF_TURN_TEXTS:
        i = text_to_id(t)
        if i is not None:
            out.add(int(i))
    return out


def check_same_vocab(expert: Backend, amateur: Backend) -> None:
    """Refuse a pair that does not share the vocabulary (size, special ids, token texts), as llama.cpp's
    speculative example does for a draft model. Raises MismatchError naming the first difference."""
    e, a = expert, amateur
    where = f"expert {e.path} vs amateur {a.path}"
    if e.vocab_size != a.vocab_size:
        raise MismatchError(f"vocabulary size differs: {e.vocab_size} vs {a.vocab_size} ({where})")
    for field_name in ("bos_id", "eos_ids", "add_bos"):
        ve, va = getattr(e, field_name), getattr(a, field_name)
        if ve != va:
            raise MismatchError(f"{field_name} differs: {_show(ve)} vs {_show(va)} ({where})")
    texts_e, texts_a = e.token_texts(), a.token_texts()
    if texts_e != texts_a:
        i = next(i for i, (te, ta) in enumerate(zip(texts_e, texts_a)) if te != ta)
        raise MismatchError(f"token {i} differs: {texts_e[i]!r} vs {texts_a[i]!r} ({where})")


def _show(v):
    return sorted(v) if isinstance(v, (set, frozenset)) else v
