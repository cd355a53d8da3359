"""Batched contrastive decoding: many requests in flight, one multi-sequence forward per model per step.

    for key, result in generate_batched(expert_ms, amateur_ms, vocab, requests):   # completion order
        ...

`requests` yields (key, prompt ids, Settings), or IDLE when it has nothing to admit yet (a server's queue:
decoding of the admitted requests goes on, and the source is asked again at the next step; with nothing in
flight it should block until a request comes). Each request gets a slot (a KV sequence of its own in both
models); at every step the expert decodes one token for every active slot (or a whole prompt for a slot
that has just been admitted) in one call, then, when some slot's pick needs the amateur (a forced pick
does not, as in loop.py), the amateur decodes what it has not seen yet. Requests
finish independently (EOS, stop string, max_tokens, full context); a finished slot takes the next request
at the next step (continuous batching).

Per request the picks are those of loop.stream_generate (same plausibility mask, scores, sampler calls,
stop rules and text stream), so greedy and seeded outputs equal running the requests one after another,
up to float rounding of the batched kernels. A slot keeps its cache between requests and reuses the
common prefix with the next prompt; where another slot holds a longer one (a system prompt shared by the
requests) and the engine can copy KV between slots, that prefix is copied instead of computed again
(SHARE_MIN positions at least). Requests that arrive together and share such a prefix are admitted one step
apart: the first one's prompt is decoded, the others copy its prefix at the next step.

Engine-free: expert_ms / amateur_ms are multi-sequence engines with decode([(slot, ids)]) -> [(V,) logits],
truncate(slot, n), tokens(slot), shared_prefix(slot, ids), copy_prefix(src, dst, n), n_past(slot), n_ctx (per
slot) and n_slots (backends/multiseq.py).

The amateur is fed "sync" by default: when any slot's pick needs its logits, every slot with unseen tokens
is fed, so its entries keep one length and one engine call does them all (lazy feeding, as loop.py, gives
catch-ups of mixed lengths, i.e. more and smaller calls). Either way the picks are the same.

Overlap (`overlap=True`): the amateur's multi-sequence decode runs in a worker thread beside the expert's,
every step, fed every token of every slot whose request uses it (lam > 0, or lazy=False), as loop.py's
overlap does for one request: the engine calls of sync feeding with lazy=False, so the picks are
bit-identical to it (tests/test_batch_overlap.py). Its whole logits are computed (the candidates are not
known before the expert's decode ends) and the candidates' rows are indexed from them: on llama.cpp the same
values. With half the cores per model (Runtime.stream_many), a 2-core CPU runs one thread per model: no
thread of one decode waits at a barrier for another that the OS has descheduled, which is what made the
batched loop several times slower than one request at a time on a busy machine (bench/batch.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .contrastive import plausible_ids
from .constraint import Matcher, candidates, forced_token
from .explain import check_top_logprobs, explain_pick
from .loop import (NO_ROWS, ROLES, Answer, Overlap, Step, check_finite, check_limits, check_prompt, common_prefix,
                   forced_run, pick_own)
from .sampling import make_logits_processors, make_sampler


IDLE = object()  # what a request source yields when it has nothing to admit yet
SHARE_MIN = 8  # prompt positions another slot must hold beyond a slot's own cache to be copied (copy_prefix)


class Cancelled(Exception):
    """The request was cancelled (e.g. its client went away); its slot was freed at once."""


@dataclass
class _Seq:
    """One request in a slot: its pick settings, what each model still has to be fed, and its Answer."""

    key: Any
    slot: int
    lam: float
    alpha: float
    lazy: bool
    sampler: Any
    processors: list
    history: list[int] | None                         # (T,) ids the processors look back on
    answer: Answer                                    # stop rules, text, tokens, stats (loop.Answer)
    feed: list[int] = field(default_factory=list)     # ids the expert is fed at the next step
    pending: list[int] = field(default_factory=list)  # ids the amateur has not seen
    x: np.ndarray | None = None                       # (V,) expert logits of the last fed position
    y: np.ndarray | None = None                       # (V,) amateur logits (rows: (K,) of ids), current when
                                                      # pending is empty
    ids: np.ndarray | None = None                     # (K,) candidates the plausibility mask kept
    uses: bool = True                                 # the request reads the amateur (lam > 0 or not lazy)
    forced: bool = False                              # a single candidate: no amateur needed
    need: bool = False                                # this pick reads the amateur's logits
    rows: bool = False                                # the amateur's logits of the candidates only (loop.py)
    matcher: Any = None                               # constraint.Matcher (structured output) or None
    fast_forward: bool = True
    cforced: bool = False                             # the constraint allows one token: emitted, no pick
    explain: bool = False                             # each Step carries an Explain (loop.py)
    top_logprobs: int = 0


def generate_batched(expert_ms, amateur_ms, vocab, requests: Iterable[tuple[Any, list[int], Any]], *,
                     on_event=None, amateur: str = "sync",
                     cancelled: Callable[[Any], bool] | None = None,
                     overlap: bool = False) -> Iterator[tuple[Any, Any]]:
    """Yield (key, result) or (key, exception) per request, in completion order.

    vocab: the expert's single-sequence Backend (eos_ids, token_bytes, vocab_size, n_ctx); settings objects
    have the fields of runtime.Settings. Each result is a loop.Result, made by the request's loop.Answer as
    in the single-request stream.
    on_event(key, Event) is called for every streamed token (optional). amateur: "sync" (when a step needs
    the amateur, every slot catches up: one decode of equal-length entries) or "lazy" (only the slots that
    need it, as loop.py; more, smaller decodes). The picks are the same either way. cancelled(key), asked
    before every step, ends a request with a Cancelled exception and frees its slot. overlap: the amateur's
    decode beside the expert's in a worker thread (see the module docstring; amateur is then unused); the
    two engines must be distinct objects that may decode from two threads at once.
    """
    if amateur not in ("sync", "lazy"):
        from ..errors import ParameterError

        raise ParameterError(f"amateur must be 'sync' or 'lazy', got {amateur!r}")
    if overlap and expert_ms is amateur_ms:
        from ..errors import ParameterError

        raise ParameterError("overlap needs two engines: the expert's and the amateur's")
    pair = Overlap() if overlap else None
    try:
        yield from _run(expert_ms, amateur_ms, vocab, iter(requests), on_event, amateur == "sync", cancelled, pair)
    finally:
        if pair is not None:
            pair.close()


def _run(expert_ms, amateur_ms, vocab, queue, on_event, sync: bool, cancelled, pair) -> Iterator[tuple[Any, Any]]:
    free = list(range(expert_ms.n_slots))[::-1]
    active: dict[int, _Seq] = {}
    exhausted = False
    held = None  # a request kept for the next step, to copy the prefix it shares with one admitted in this one
    shared = 2  # overlap: the parts the cores are shared in (stream_many starts with 2: half each)
    while True:
        admitted: list[list[int]] = []  # prompts admitted at this step (not decoded yet)
        while free and not exhausted:  # admit new requests into free slots
            nxt, held = (held, None) if held is not None else (next(queue, None), None)
            if nxt is None:
                exhausted = True
                break
            if nxt is IDLE:
                break
            key, ids, s = nxt
            if admitted and _wait_to_share(expert_ms, ids, admitted):
                held = nxt
                break
            try:
                seq = _admit(key, free[-1], ids, s, expert_ms, amateur_ms, vocab)
            except Exception as e:  # a bad request fails alone
                yield key, e
                continue
            if seq.answer.reason is not None:  # max_tokens 0
                yield key, _result(seq)
                continue
            admitted.append(list(ids))  # decoded at this step: a prefix to copy at the next
            active[free.pop()] = seq
        if cancelled is not None:
            for seq in [q for q in active.values() if cancelled(q.key)]:
                _release(seq, active, free)
                yield seq.key, Cancelled(f"request {seq.key!r} cancelled")
        if not active:
            if exhausted:
                return
            continue
        seqs = list(active.values())
        try:
            if pair is None:
                _forward(expert_ms, amateur_ms, seqs, sync)
            else:
                # the cores are shared while some request reads the amateur; the expert alone (lambda 0) has
                # them all, as one such request at a time has
                parts = 2 if any(q.uses for q in seqs) else 1
                if parts != shared:
                    for ms in (expert_ms, amateur_ms):
                        ms.share_cores(parts)
                    shared = parts
                _forward_overlapped(expert_ms, amateur_ms, seqs, pair)
        except Exception as e:  # an engine failure: every request in flight fails, the rest go on
            for seq in seqs:
                _release(seq, active, free)
                yield seq.key, e
            continue
        for seq in seqs:
            try:
                reason = _pick(seq, vocab, expert_ms, on_event)
            except Exception as e:
                _release(seq, active, free)
                yield seq.key, e
                continue
            if reason is not None:
                _release(seq, active, free)
                yield seq.key, _result(seq)


def _admit(key, slot: int, ids, s, expert_ms, amateur_ms, vocab) -> _Seq:
    stop = check_limits(s.max_tokens, s.stop)
    prompt = check_prompt(ids, vocab, n_ctx=expert_ms.n_ctx)
    processors = list(make_logits_processors(s.repetition_penalty, s.repetition_context_size))
    seq = _Seq(key, slot, s.lam, s.alpha, s.lazy, make_sampler(s.temp, s.top_p, s.top_k, s.min_p, s.seed),
               processors, list(prompt) if processors else None,
               Answer(len(prompt), s.max_tokens, stop, vocab, expert_ms.n_ctx),
               explain=bool(getattr(s, "explain", False)),
               top_logprobs=check_top_logprobs(getattr(s, "top_logprobs", 0)))
    seq.rows = bool(getattr(s, "candidate_head", True)) and not processors and not seq.explain
    seq.fast_forward = bool(getattr(s, "fast_forward", True)) and not seq.explain  # explain: every token its logits
    if getattr(s, "constraint", None) is not None:
        seq.matcher = Matcher(s.constraint, vocab)
    seq.uses = s.lam > 0 or not s.lazy
    if seq.answer.reason is None:
        seq.feed = _reuse(expert_ms, slot, prompt)
        seq.pending = _reuse(amateur_ms, slot, prompt)
    return seq


def _reuse(ms, slot: int, prompt: list[int]) -> list[int]:
    """Keep the slot's cached common prefix with the prompt (at most len - 1), or copy a longer one (by
    SHARE_MIN) from another slot where the engine can; the ids still to feed."""
    head = prompt[:-1]
    k = ms.shared_prefix(slot, head)
    src, best = _best_source(ms, head, slot)
    if src is not None and best >= k + SHARE_MIN:
        if ms.copy_prefix(src, slot, best):
            return prompt[best:]
        k = ms.shared_prefix(slot, head)  # a copy that failed half-way leaves the slot empty
    ms.truncate(slot, k)
    return prompt[k:]


def _best_source(ms, head: list[int], slot: int) -> tuple[int | None, int]:
    """The other slot whose cache shares the longest prefix with head, and that length (None, 0: no engine
    copy, or no other slot shares any)."""
    if not getattr(ms, "can_copy", False):
        return None, 0
    best, src = 0, None
    for other in range(ms.n_slots):
        if other != slot:
            j = ms.shared_prefix(other, head)
            if j > best:
                best, src = j, other
    return src, best


def _wait_to_share(ms, ids, admitted: list[list[int]]) -> bool:
    """Whether a request should wait one step: a prompt admitted at this step shares a longer prefix with it
    (by SHARE_MIN) than any slot's cache, and the engine can copy it once that prompt is decoded."""
    if not getattr(ms, "can_copy", False):
        return False
    head = list(ids)[:-1]
    pending = max(common_prefix(p, head) for p in admitted)
    cached = max(ms.shared_prefix(s, head) for s in range(ms.n_slots))
    return pending >= cached + SHARE_MIN


def _forward(expert_ms, amateur_ms, seqs: list[_Seq], sync: bool) -> None:
    """One expert decode for every slot, then the amateur decode: when any slot's pick needs the amateur,
    every slot with unseen tokens is fed (sync: the entries stay of equal length, so one llama_decode does
    them all), or only the slots that need it (lazy, as the single-request loop)."""
    xs = expert_ms.decode([(q.slot, q.feed) for q in seqs])
    for q, x in zip(seqs, xs):
        check_finite(x, ROLES[0], expert_ms, expert_ms.n_past(q.slot) - 1)
        q.answer.stats.expert_prefill_tokens += len(q.feed) if q.answer.t_first is None else 0
        q.answer.stats.expert_forwards += 1
        q.x, q.feed = x, []
    need = [q for q in seqs if _needs_amateur(q) and q.pending]
    if need and sync:
        need = [q for q in seqs if q.pending]
    if need:
        # the candidates' logits only where the pick reads them; none for a slot fed only to stay in sync
        rows = [(q.ids if q.need else NO_ROWS) if q.rows else None for q in need]
        ys = amateur_ms.decode([(q.slot, q.pending) for q in need], rows=rows)
        for q, y in zip(need, ys):
            if y.size:  # an empty y: fed to stay in sync, not read
                check_finite(y, ROLES[1], amateur_ms, amateur_ms.n_past(q.slot) - 1)
            q.answer.stats.amateur_prefill_tokens += len(q.pending) if len(q.pending) > 1 else 0
            q.answer.stats.amateur_forwards += 1
            q.y, q.pending = y, []


def _forward_overlapped(expert_ms, amateur_ms, seqs: list[_Seq], pair: Overlap) -> None:
    """The expert's decode for every slot in this thread and, at the same time, the amateur's in the worker
    for every slot whose request uses it (whole logits: the candidates are not known yet)."""
    fed = [q for q in seqs if q.uses]
    entries = [(q.slot, q.pending) for q in fed]
    if entries:
        xs, ys = pair.run(lambda: expert_ms.decode([(q.slot, q.feed) for q in seqs]), lambda: amateur_ms.decode(entries))
    else:  # nothing for the amateur (lambda 0): no hand-off to the worker
        xs, ys = expert_ms.decode([(q.slot, q.feed) for q in seqs]), []
    for q, x in zip(seqs, xs):
        check_finite(x, ROLES[0], expert_ms, expert_ms.n_past(q.slot) - 1)
        q.answer.stats.expert_prefill_tokens += len(q.feed) if q.answer.t_first is None else 0
        q.answer.stats.expert_forwards += 1
        q.x, q.feed = x, []
    for q, y in zip(fed, ys):
        check_finite(y, ROLES[1], amateur_ms, amateur_ms.n_past(q.slot) - 1)
        q.answer.stats.amateur_prefill_tokens += len(q.pending) if len(q.pending) > 1 else 0
        q.answer.stats.amateur_forwards += 1
        q.y, q.pending = y, []
    for q in seqs:
        if _needs_amateur(q) and q.rows:
            q.y = q.y[q.ids]  # (K,) the candidates' rows, as the non-overlapped decode returns them


def _needs_amateur(q: _Seq) -> bool:
    q.cforced = False
    if q.matcher is not None:  # structured output: loop.generate_step's rules (decoding/constraint.py)
        allowed = q.matcher.allowed()  # (A,) ascending
        token = forced_token(q.x, allowed, q.answer.vocab.eos_ids)
        if token is not None:  # one allowed token, or only the end: no pick
            q.ids, q.forced, q.cforced, q.need = np.array([token]), True, True, False
            return False
        q.ids = candidates(q.x, allowed, q.alpha)  # (K,) ascending
    else:
        q.ids = plausible_ids(q.x, q.alpha)  # (K,) ascending
    q.forced = len(q.ids) == 1
    q.need = not q.lazy or (q.lam > 0 and not q.forced)
    return q.need


def _pick(q: _Seq, vocab, expert_ms, on_event) -> tuple[str, str] | None:
    """loop.generate_step's pick, then the request's Answer (loop.stream_generate's stop rules and text);
    the finish reason or None."""
    need = q.need
    if q.cforced:
        token = own = int(q.ids[0])
    else:
        token, own = pick_own(q.x, q.y, q.ids, q.lam, q.sampler, bool(q.processors), q.processors, q.history,
                              q.rows)
    exp = explain_pick(q.x, q.y if need else None, q.ids, q.lam, token, own, q.top_logprobs) if q.explain else None
    feed = [token]
    steps = [Step(token, token != own, not need, len(q.ids), explain=exp, forced=q.cforced)]
    if q.matcher is not None:
        q.matcher.consume([token])
        n_past = expert_ms.n_past(q.slot)
        run = forced_run(q.matcher, q.fast_forward, token, vocab.eos_ids, expert_ms.n_ctx - n_past - 2)
        feed += run
        steps += [Step(t, False, True, 1, forced=True) for t in run]
    for i, step in enumerate(steps):
        if i:
            q.matcher.consume([step.token])
        ev = q.answer.add(step, expert_ms.n_past(q.slot))
        if ev is not None and on_event is not None:
            on_event(q.key, ev)
        if q.answer.reason is not None:
            return q.answer.reason
    if q.history is not None:
        q.history.extend(feed)
    q.feed = feed
    q.pending.extend(feed)
    return None


def _result(q: _Seq):
    if q.matcher is not None:
        q.answer.stats.constraint_complete = q.matcher.complete
    return q.answer.result()


def _release(q: _Seq, active: dict, free: list) -> None:
    """Free the slot; its caches stay, for prefix reuse by the next request there."""
    del active[q.slot]
    free.append(q.slot)
