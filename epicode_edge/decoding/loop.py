"""The decoding loop: one generator at the bottom, one streaming layer above it (mlx-lm's generate shape).

    generate_step(expert, amateur, prompt, ...)  -> Step per picked token (forever; the caller stops it)
    stream_generate(expert, amateur, prompt, ...) -> Event per token (text delta, UTF-8 safe), then a final
                                                     Event with finish_reason and Stats

Lazy amateur: when the expert's plausibility mask keeps a single token, contrastive decoding picks it whatever
the amateur says, so the amateur's forward is skipped; the tokens it has not seen wait and are fed when its
logits are next needed (tokens never needed, at the end of an answer, are never fed). With lam == 0 the
amateur is never needed. How the waiting generated tokens are fed (`catch_up`):
    "steps"  one forward per token, the prompt part in one batch: exactly the naive loop's sequence of engine
             calls, so the logits, hence greedy and seeded-sampling outputs, are bit-identical to lazy=False
    "batch"  one batched forward for all of them: fewer calls (on GPUs and memory-bound CPUs a small batch
             costs about one step); equal to the naive loop in exact arithmetic, and in floating point up to
             the engine's batch-size-dependent rounding (the rounding that also separates a batched prompt
             prefill from token-by-token feeding)
    "auto"   "batch" where the engine's measured costs (Backend.costs) make a batch of that size cheaper than
             its steps, "steps" elsewhere (e.g. llama.cpp Q8_0 on x86 CPUs, where 2 tokens cost ~3 steps)
Both paths call the sampler the same way (one call, hence one random draw, per pick), so forced picks never
shift the random stream.

Candidate head (`candidate_head=True`): the pick reads the amateur's logits of the K plausible candidates only
(raw logits: their log-normaliser is one constant for all candidates, see decoding/contrastive.py), so the
amateur's forward asks for those K rows (`rows`): engines with `partial_head` (MLX) compute only those rows
of the output layer, the others compute all and index (llama.cpp: the same values, bit for bit). The
catch-up forwards whose logits are never read (steps mode) ask for none: both engines then skip the output
layer. With logits processors (normalize) the whole layer runs. Same picks as the whole layer wherever its K
rows give the same values (always on llama.cpp; on MLX's CPU backend too: test_backends).

Overlap (`overlap=True`): whenever the amateur is in use (lam > 0, or lazy=False), both models consume every
token at the same time: the amateur's forward runs in a worker thread while the expert's runs in the calling
thread (llama.cpp releases the GIL inside llama_decode, so on a CPU with >= 2 cores the two passes share the
cores). That is the naive loop's sequence of engine calls for each model (prompt in one prefill, then one step
per pick), so outputs are bit-identical to lazy=False; a forced pick just does not read the amateur's logits.
The prompt prefills overlap too. An error in either forward is raised after both have finished (the expert's
first); Ctrl-C waits for the amateur's forward before it propagates, so both caches stay consistent. Engines
that cannot run forwards from two threads (Backend.concurrent false, e.g. MLX) keep the sequential path.

Explain (`explain=True`): each Step and Event carries an Explain (decoding/explain.py): the expert's own pick,
the candidates with both models' log-probabilities and contrastive scores, the expert's top log-probs; the
amateur's whole output layer is then read (its candidate rows alone have no log-normaliser). Off (the default),
nothing of it is computed.

Broken weights: logits holding NaN or +Inf (or all -Inf) stop the request with a NumericError naming the role
(expert / amateur) and the token position (`check_finite`, one max over the vocabulary per forward).

Structured output (`matcher`, decoding/constraint.py): tokens the constraint forbids are out before the
plausibility mask, which is taken over the allowed tokens; a token the constraint forces is emitted without a
pick (no sampler draw, no amateur: a skipped step); with fast_forward the forced run after a pick is emitted at
once and fed to the expert with the pick in one batch (the amateur gets it in its next catch-up; with overlap,
both models get it at once).

Cache reuse: each model keeps what it has cached; a new prompt is compared with it and only the tokens after
the common prefix are fed (chat turns prefill only their new tokens; the amateur catches up lazily).
"""

from __future__ import annotations

import codecs
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as _wait_futures
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from ..errors import ContextFullError, NumericError, ParameterError
from .constraint import Matcher, candidates, forced_token
from .contrastive import candidate_scores, check_alpha, check_lam, plausible_ids
from .explain import Explain, check_top_logprobs, explain_pick
from .sampling import Sampler, greedy


ROLES = ("expert", "amateur")  # what error messages call the two models


@dataclass
class Step:
    """One pick of the bottom generator."""

    token: int
    changed: bool      # the contrastive pick differs from the expert's own (same settings, same random draw)
    skipped: bool      # no amateur forward was needed for this pick (forced pick, or lam == 0)
    n_candidates: int  # tokens the plausibility mask kept
    overlap_s: float = 0.0  # forward time hidden by running the two models at once (overlap), since the last pick
    explain: Explain | None = None  # what contrastive decoding did (explain=True only; decoding/explain.py)
    forced: bool = False    # a constraint forced this token (no pick)


@dataclass
class Stats:
    """Counts and timings of one request (the final Event carries it)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0       # tokens in the answer (the terminating EOS / end-of-turn excluded)
    picks: int = 0                   # tokens picked, the terminating EOS included
    changed: int = 0                 # picks where contrastive decoding changed the expert's choice
    amateur_skipped: int = 0         # picks that needed no amateur forward
    expert_prefill_tokens: int = 0   # tokens the expert prefilled (the rest of the prompt came from its cache)
    amateur_prefill_tokens: int = 0  # tokens the amateur prefilled (prompt + catch-up of skipped tokens)
    expert_forwards: int = 0
    amateur_forwards: int = 0
    ttft_s: float = 0.0              # start to first pick (prefill + first step)
    decode_s: float = 0.0            # first pick to the end
    total_s: float = 0.0
    expert_forward_s: float = 0.0    # time inside the engines' forward passes
    amateur_forward_s: float = 0.0
    overlap_s: float = 0.0           # of those, time the two models' forwards ran at the same time (overlap)
    forced: int = 0                  # tokens a constraint forced (emitted without a pick)
    constraint_complete: bool | None = None  # with a constraint: whether the answer matches it whole (False:
                                             # it stopped first, e.g. at max_tokens, and will not parse)

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: picks after the first, per second of decoding."""
        return (self.picks - 1) / self.decode_s if self.picks > 1 and self.decode_s > 0 else 0.0

    @property
    def skip_rate(self) -> float:
        return self.amateur_skipped / self.picks if self.picks else 0.0

    @property
    def loop_overhead_s(self) -> float:
        """Wall time outside the engines' forward passes (masking, scoring, sampling, detokenizing)."""
        return max(0.0, self.total_s - self.expert_forward_s - self.amateur_forward_s + self.overlap_s)

    @property
    def overhead_us_per_token(self) -> float:
        return 1e6 * self.loop_overhead_s / self.picks if self.picks else 0.0

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(tokens_per_s=self.tokens_per_s, skip_rate=self.skip_rate, loop_overhead_s=self.loop_overhead_s,
                 overhead_us_per_token=self.overhead_us_per_token)
        return d


@dataclass
class Event:
    """What stream_generate yields: one per answer token, then a final one with finish_reason and stats."""

    text: str = ""                    # new text (may be "" while bytes or a possible stop string are held)
    token: int | None = None          # the picked token id (None on the final event)
    changed: bool = False
    skipped: bool = False
    finish_reason: str | None = None  # final event only: "stop" (EOS/end-of-turn or stop string) | "length"
    stopped_by: str | None = None     # final event only: "eos" | "stop_string" | "max_tokens" | "context_full"
    stats: Stats | None = field(default=None, repr=False)
    explain: Explain | None = field(default=None, repr=False)  # explain=True only: candidates, log-probs, scores

    @property
    def final(self) -> bool:
        return self.finish_reason is not None

    @property
    def timings(self) -> dict | None:
        """The final event's counts and timings as a flat dict (None before)."""
        return self.stats.as_dict() if self.stats is not None else None


# ----------------------------------------------------------------------------------------------
# the bottom generator
# ----------------------------------------------------------------------------------------------


CATCH_UP = ("auto", "batch", "steps")


def check_catch_up(catch_up: str) -> str:
    if catch_up not in CATCH_UP:
        raise ParameterError(f"catch_up must be one of {', '.join(CATCH_UP)}, got {catch_up!r}")
    return catch_up


def generate_step(expert, amateur, prompt: Sequence[int], *, lam: float, alpha: float,
                  sampler: Sampler = greedy, processors: Sequence = (), lazy: bool = True,
                  catch_up: str = "auto", overlap: bool = False, candidate_head: bool = True,
                  roles: tuple[str, str] = ROLES, matcher=None, fast_forward: bool = True,
                  explain: bool = False, top_logprobs: int = 0) -> Iterator[Step]:
    """Yield one Step per picked token, forever (close the generator to stop).

    expert, amateur: Backends (amateur may be None when lam == 0: one model alone). The expert is stepped
    with a pick only when the next pick is asked for, so stopping after a pick wastes no forward pass.
    overlap: run the amateur's forwards beside the expert's (see the module docstring); ignored when the
    amateur is not in use or an engine is not `concurrent`. candidate_head: the
    amateur's logits of the candidates only (see the module docstring). matcher: a constraint.Matcher over
    the expert's vocabulary (structured output, see decoding/constraint.py: forbidden tokens are out first,
    a token the constraint forces is emitted without a pick and needs no amateur); fast_forward: emit the
    constraint's forced runs at once and feed them in one batch. explain: each Step carries an Explain
    (decoding/explain.py; the amateur's whole output layer is then read, and fast-forward is off, so that every
    token has its logits), with the expert's top_logprobs most likely tokens.
    """
    if amateur is None and (lam != 0 or not lazy):
        raise ParameterError("an amateur model is needed when lambda > 0")
    if overlap and can_overlap(expert, amateur, lam, lazy):
        yield from _overlapped_steps(expert, amateur, prompt, lam=lam, alpha=alpha, sampler=sampler,
                                     processors=processors, roles=roles, explain=explain,
                                     top_logprobs=top_logprobs, matcher=matcher, fast_forward=fast_forward)
        return
    prompt = [int(t) for t in prompt]
    history = list(prompt) if processors else None  # (T,) ids the processors look back on
    x = check_finite(expert.prefill(_reuse_cache(expert, prompt)), roles[0], expert)  # (V,) expert logits
    fresh = None  # prompt ids the amateur has not seen (its cache is matched to the prompt when first needed)
    pending: list[int] = []  # generated ids the amateur has not seen
    y = None  # (V,) amateur logits (rows: (K,) of the ids), current when fresh and pending are empty
    normalize = bool(processors)
    rows = candidate_head and not normalize and not explain and amateur is not None
    fast_forward = fast_forward and not explain  # explain: every token is fed alone and has its logits
    feed: list[int] = []  # ids picked or forced since the expert's last forward
    run: list[int] = []  # ids the constraint forces after the last pick (fast-forward; none before the first)
    while True:
        if run:  # emitted without picks, fed to the expert with the pick before them in one batch
            for t in run:  # consumed one by one: an answer cut inside the run is not taken for complete
                matcher.consume([t])
                yield Step(t, False, True, 1, forced=True)
            feed, run = feed + run, []
        if feed:
            x = check_finite(expert.step(feed[0]) if len(feed) == 1 else expert.prefill(feed), roles[0], expert)
            _extend(history, pending, amateur, feed)
            feed = []
        if matcher is not None:
            allowed, token, exp = _constrained(matcher, x, expert.eos_ids, lam, explain, top_logprobs)
            if token is not None:  # the constraint allows one token (or only the end): emitted without a pick
                yield Step(token, False, True, 1, explain=exp, forced=True)
                feed, run = [token], forced_run(matcher, fast_forward, token, expert.eos_ids, _room(expert))
                continue
            ids = candidates(x, allowed, alpha)  # (K,) ascending, the allowed plausible ones
        else:
            ids = plausible_ids(x, alpha)  # (K,) ascending
        forced = len(ids) == 1
        need = not lazy or (lam > 0 and not forced)
        if need and (fresh is None or fresh or pending):
            if fresh is None:
                fresh = _reuse_cache(amateur, prompt)
            y = check_finite(_catch_up(amateur, fresh, pending, catch_up, ids if rows else None), roles[1], amateur)
            fresh, pending = [], []
        token, own = pick_own(x, y, ids, lam, sampler, normalize, processors, history, rows)
        exp = explain_pick(x, y if need else None, ids, lam, token, own, top_logprobs) if explain else None
        yield Step(token, token != own, not need, len(ids), explain=exp)
        feed = [token]
        if matcher is not None:
            matcher.consume([token])
            run = forced_run(matcher, fast_forward, token, expert.eos_ids, _room(expert))


def _constrained(matcher, x, eos_ids, lam: float, explain: bool, top_logprobs: int):
    """(allowed ids (A,) ascending, the token the constraint forces or None, its Explain or None); a forced
    token is consumed by the matcher here."""
    allowed = matcher.allowed()
    token = forced_token(x, allowed, eos_ids)
    if token is None:
        return allowed, None, None
    matcher.consume([token])
    return allowed, token, explain_pick(x, None, allowed, lam, token, token, top_logprobs) if explain else None


def _room(expert) -> int:
    return expert.n_ctx - expert.n_past - 2  # positions left after the pending pick, less one


def forced_run(matcher, fast_forward: bool, last: int, eos_ids, room: int) -> list[int]:
    """The run of tokens the constraint forces after token `last` ([] without fast-forward, once the answer
    ended, or without room: at most `room` tokens, so that the run and the pick fit the context)."""
    if matcher is None or not fast_forward or last in eos_ids:
        return []
    return matcher.forced_run()[:max(0, room)]


def _extend(history: list[int] | None, pending: list[int], amateur, ids: list[int]) -> None:
    if history is not None:
        history.extend(ids)
    if amateur is not None:
        pending.extend(ids)


def can_overlap(expert, amateur, lam: float, lazy: bool) -> bool:
    """Whether overlap applies: the amateur is in use and both engines run forwards from two threads."""
    return (amateur is not None and (lam > 0 or not lazy)
            and expert.concurrent and amateur.concurrent)


def _overlapped_steps(expert, amateur, prompt, *, lam, alpha, sampler, processors, roles=ROLES,
                      explain=False, top_logprobs=0, matcher=None, fast_forward=True) -> Iterator[Step]:
    """generate_step with both models fed every token at once (the naive loop's engine calls, overlapped).
    With a constraint (matcher): its forced tokens are fed to both models too (a forced run with the pick
    before it in one batch, fast_forward)."""
    prompt = [int(t) for t in prompt]
    history = list(prompt) if processors else None
    normalize = bool(processors)
    fast_forward = fast_forward and not explain
    pair = Overlap()
    try:
        x, y = pair.run(lambda: expert.prefill(_reuse_cache(expert, prompt)),
                        lambda: amateur.prefill(_reuse_cache(amateur, prompt)))  # (V,), (V,)
        while True:
            check_finite(x, roles[0], expert), check_finite(y, roles[1], amateur)
            if matcher is not None:
                allowed, token, exp = _constrained(matcher, x, expert.eos_ids, lam, explain, top_logprobs)
                if token is not None:  # the constraint allows one token (or only the end): emitted without a pick
                    yield Step(token, False, True, 1, pair.take_saved(), exp, forced=True)
                    feed = [token] + forced_run(matcher, fast_forward, token, expert.eos_ids, _room(expert))
                    for t in feed[1:]:
                        matcher.consume([t])
                        yield Step(t, False, True, 1, forced=True)
                    x, y = _feed_both(pair, expert, amateur, feed, history)
                    continue
                ids = candidates(x, allowed, alpha)  # (K,) ascending, the allowed plausible ones
            else:
                ids = plausible_ids(x, alpha)  # (K,) ascending
            token, own = pick_own(x, y, ids, lam, sampler, normalize, processors, history)
            forced = len(ids) == 1  # its pick reads no amateur logits (they are computed all the same)
            exp = explain_pick(x, None if forced else y, ids, lam, token, own, top_logprobs) if explain else None
            yield Step(token, token != own, forced, len(ids), pair.take_saved(), exp)
            feed = [token]
            if matcher is not None:
                matcher.consume([token])
                for t in forced_run(matcher, fast_forward, token, expert.eos_ids, _room(expert)):
                    matcher.consume([t])
                    yield Step(t, False, True, 1, forced=True)
                    feed.append(t)
            x, y = _feed_both(pair, expert, amateur, feed, history)
    finally:
        pair.close()


def _feed_both(pair, expert, amateur, feed: list[int], history) -> tuple:
    """Both models fed the picked (and forced) ids at once: a step for one id, else one batch."""
    if history is not None:
        history.extend(feed)
    if len(feed) == 1:
        return pair.run(lambda: expert.step(feed[0]), lambda: amateur.step(feed[0]))
    return pair.run(lambda: expert.prefill(feed), lambda: amateur.prefill(feed))


def pick_own(x, y, ids, lam, sampler, normalize, processors, history, y_on_ids=False) -> tuple[int, int]:
    """The contrastive pick among ids (K,) and the expert's own pick with the same random draw (they differ
    where contrastive decoding changed the pick). x, y: (V,) expert and amateur logits, or y (K,) the
    amateur's of ids only (y_on_ids); y is read only when lam > 0 and K > 1."""
    if len(ids) == 1:  # one candidate: its score is irrelevant; the sampler still draws, as for any pick
        (k,), k_own = sampler(_ONE), None
    elif lam > 0:
        s = processed_scores(x, y, ids, lam, normalize, processors, history, y_on_ids)  # (K,)
        own = processed_scores(x, None, ids, 0.0, normalize, processors, history)  # (K,) the expert alone
        k, k_own = sampler(s, own)
    else:
        (k,), k_own = sampler(processed_scores(x, None, ids, 0.0, normalize, processors, history)), None
    return int(ids[k]), int(ids[k if k_own is None else k_own])


class Overlap:
    """The amateur's forward in one worker thread while the expert's runs in the calling thread (also the
    batched loop's, decoding/batch_loop.py)."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="epicode-amateur")
        self._saved = 0.0

    def run(self, expert_call, amateur_call):
        """(expert_call(), amateur_call()), run at the same time. Both have finished when this returns or
        raises: the expert's error first, else the amateur's; Ctrl-C waits for the amateur's forward."""
        t = time.perf_counter()
        job = self._pool.submit(_timed, amateur_call)
        try:
            x, dt_x = _timed(expert_call)
        except BaseException:
            _join(job)
            raise
        y, dt_y = _join(job).result()
        self._saved += dt_x + dt_y - (time.perf_counter() - t)
        return x, y

    def take_saved(self) -> float:
        saved, self._saved = self._saved, 0.0
        return saved

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _timed(call):
    t = time.perf_counter()
    out = call()
    return out, time.perf_counter() - t


def _join(job):
    """Wait for job to finish; a Ctrl-C meanwhile is raised once it has (the backends stay consistent)."""
    interrupted = False
    while not job.done():
        try:
            _wait_futures([job])
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        raise KeyboardInterrupt
    return job


_ONE = np.zeros(1, dtype=np.float32)  # the scores of a forced pick


def check_finite(logits: np.ndarray, role: str, backend, position: int | None = None) -> np.ndarray:
    """logits (V,) as given, or NumericError naming the role and the token position when they hold NaN or
    +Inf, or are all -Inf (broken weights: a too large mu, corrupted files). One max over V: NaN propagates."""
    m = logits.max()
    if not np.isfinite(m):
        n = backend.n_past if position is None else position + 1
        raise NumericError(f"the {role} model gave non-finite logits (NaN/Inf) at token position {n - 1} "
                           f"({backend.path}): its weights are broken (a too large mu? a corrupted file?)")
    return logits


def _catch_up(amateur, fresh: list[int], pending: list[int], mode: str, rows: np.ndarray | None = None) -> np.ndarray:
    """Feed the amateur the prompt ids (fresh) and generated ids (pending) it has not seen; logits (V,) of the
    last, or with rows (K,) its logits of those ids (the forwards before it then ask for no logits: no output
    layer). See the module docstring for the modes."""
    k = len(pending)
    batch = mode == "batch" or (mode == "auto" and k > 1 and amateur.costs.batch_is_cheaper(k))
    if batch or k == 0:
        return amateur.prefill(fresh + pending, rows=rows)
    unread = None if rows is None else NO_ROWS
    if fresh:
        amateur.prefill(fresh, rows=unread)
    for t in pending[:-1]:
        amateur.step(t, rows=unread)
    return amateur.step(pending[-1], rows=rows)


NO_ROWS = np.zeros(0, dtype=np.int64)  # rows asking for no logits: the engines run no output layer


def processed_scores(x, y, ids, lam, normalize, processors, history, y_on_ids=False) -> np.ndarray:
    """Contrastive scores (K,) of the candidate ids, then the logits processors (repetition penalty) on them."""
    s = candidate_scores(x, y, ids, lam, normalize, y_on_ids)  # (K,)
    for proc in processors:
        s = proc(history, ids, s)
    return s


def _reuse_cache(backend, prompt: list[int]) -> list[int]:
    """Truncate the backend's cache to its common prefix with prompt (at most len - 1, so that at least one
    token is fed and gives logits); return the ids still to feed."""
    k = common_prefix(backend.tokens, prompt[:-1])
    backend.truncate(k)
    return prompt[k:]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


# ----------------------------------------------------------------------------------------------
# the streaming layer: text, stops, limits, timings
# ----------------------------------------------------------------------------------------------


def check_prompt(prompt: Sequence[int], expert, n_ctx: int | None = None) -> list[int]:
    """The prompt as ints, checked against the vocabulary and the context (n_ctx, default the expert's)."""
    n_ctx = expert.n_ctx if n_ctx is None else n_ctx
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ParameterError("the prompt is empty (no tokens)")
    bad = next((t for t in prompt if not 0 <= t < expert.vocab_size), None)
    if bad is not None:
        raise ParameterError(f"prompt token id {bad} is outside the vocabulary of {expert.vocab_size}")
    if len(prompt) > n_ctx:
        raise ContextFullError(f"the prompt has {len(prompt)} tokens, more than the context of {n_ctx} "
                               f"(raise n_ctx or shorten the prompt)")
    return prompt


def check_limits(max_tokens: int, stop) -> list[str]:
    if not isinstance(max_tokens, (int, np.integer)) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise ParameterError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
    stop = [stop] if isinstance(stop, str) else list(stop or ())
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ParameterError(f"stop strings must be non-empty strings, got {s!r}")
    return stop


def stream_generate(expert, amateur, prompt: Sequence[int], *, lam: float, alpha: float,
                    sampler: Sampler = greedy, processors: Sequence = (), max_tokens: int = 256,
                    stop: Sequence[str] = (), lazy: bool = True, catch_up: str = "auto",
                    overlap: bool = False, candidate_head: bool = True,
                    roles: tuple[str, str] = ROLES, constraint=None, fast_forward: bool = True,
                    explain: bool = False, top_logprobs: int = 0) -> Iterator[Event]:
    """Yield an Event per answer token, then a final Event (finish_reason, stopped_by, stats).

    Stops on the expert's EOS / end-of-turn ids, a stop string (not emitted, even when it spans tokens),
    max_tokens ("length"), or a full context ("length", stopped_by "context_full"). Arguments are checked
    on the first next(), before any work: a prompt longer than the context raises ContextFullError.
    constraint: a decoding/constraint.py Constraint (structured output); the final Event's stats then say
    whether the answer matches it whole (constraint_complete: False when max_tokens or a stop string ended it
    first, with finish_reason "length" / "stop").
    explain: each token's Event carries an Explain (decoding/explain.py); the terminating EOS has no Event.
    """
    lam, alpha = check_lam(lam), check_alpha(alpha)
    top_logprobs = check_top_logprobs(top_logprobs)
    stop = check_limits(max_tokens, stop)
    check_catch_up(catch_up)
    prompt = check_prompt(prompt, expert)
    if amateur is None and (lam != 0 or not lazy):
        raise ParameterError("an amateur model is needed when lambda > 0")
    matcher = Matcher(constraint, expert) if constraint is not None else None
    yield from _stream(expert, amateur, prompt, lam, alpha, sampler, processors, max_tokens, stop, lazy,
                       catch_up, bool(overlap), bool(candidate_head), roles, matcher, bool(fast_forward),
                       bool(explain), top_logprobs)


def _stream(expert, amateur, prompt, lam, alpha, sampler, processors, max_tokens, stop, lazy,
            catch_up, overlap, candidate_head=True, roles=ROLES, matcher=None, fast_forward=True, explain=False,
            top_logprobs=0) -> Iterator[Event]:
    models = [expert] + ([amateur] if amateur is not None else [])
    c0 = [_snapshot(m) for m in models]
    answer = Answer(len(prompt), max_tokens, stop, expert, expert.n_ctx)
    steps = generate_step(expert, amateur, prompt, lam=lam, alpha=alpha, sampler=sampler,
                          processors=processors, lazy=lazy, catch_up=catch_up, overlap=overlap,
                          candidate_head=candidate_head, roles=roles, matcher=matcher,
                          fast_forward=fast_forward, explain=explain,
                          top_logprobs=top_logprobs) if answer.reason is None else _nothing()
    try:
        for step in steps:
            ev = answer.add(step, expert.n_past)
            if ev is not None:
                yield ev
            if answer.reason is not None:
                break
    finally:
        steps.close()
    if matcher is not None:
        answer.stats.constraint_complete = matcher.complete
    final = answer.finish()
    _fill_counters(answer.stats, models, c0)
    yield final


def _nothing() -> Iterator[Step]:
    yield from ()


def _snapshot(backend) -> tuple:
    c = backend.counters
    return c.prefill_tokens, c.forward_calls, c.forward_seconds


def _fill_counters(st: Stats, models, c0) -> None:
    deltas = [tuple(a - b for a, b in zip(_snapshot(m), c)) for m, c in zip(models, c0)]
    st.expert_prefill_tokens, st.expert_forwards, st.expert_forward_s = deltas[0]
    if len(deltas) > 1:
        st.amateur_prefill_tokens, st.amateur_forwards, st.amateur_forward_s = deltas[1]


# ----------------------------------------------------------------------------------------------
# one request's answer: the per-sequence unit both loops drive
# ----------------------------------------------------------------------------------------------


@dataclass
class Result:
    """A finished request (what Runtime.generate() and compare() return)."""

    text: str
    tokens: list[int]               # the answer's token ids (the terminating EOS / end-of-turn excluded)
    finish_reason: str              # "stop" | "length"
    stopped_by: str                 # "eos" | "stop_string" | "max_tokens" | "context_full"
    prompt_tokens: int
    completion_tokens: int
    changed_tokens: int             # picks where contrastive decoding changed the expert's choice
    stats: Stats = field(repr=False, default_factory=Stats)

    @property
    def timings(self) -> dict:
        """Counts and timings as a flat dict (ttft_s, decode_s, total_s, tokens_per_s, skip_rate, ...)."""
        return self.stats.as_dict()

    def as_dict(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "finish_reason": self.finish_reason,
                "stopped_by": self.stopped_by, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "changed_tokens": self.changed_tokens,
                "timings": self.timings}


class Collector:
    """Joins streamed Events: `add(ev)` each, then `text`, `tokens`, and `result()` once the final one came."""

    def __init__(self):
        self.pieces: list[str] = []
        self.tokens: list[int] = []
        self.last: Event | None = None

    def add(self, ev: Event) -> Event:
        self.pieces.append(ev.text)
        if ev.token is not None:
            self.tokens.append(ev.token)
        self.last = ev
        return ev

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def result(self) -> Result | None:
        """The Result, or None when the stream ended before its final Event (interrupted)."""
        last = self.last
        if last is None or not last.final:
            return None
        st = last.stats
        return Result(self.text, list(self.tokens), last.finish_reason, last.stopped_by, st.prompt_tokens,
                      st.completion_tokens, st.changed, st)


def collect(events: Iterator[Event]) -> Result:
    """Join a stream of Events into a Result."""
    c = Collector()
    for ev in events:
        c.add(ev)
    return c.result()


class Answer:
    """One request's answer as its picks come: the stop rules (EOS / end-of-turn, stop strings that may span
    tokens and are never emitted, max_tokens, a full context), the UTF-8-safe text, the tokens and the Stats.
    The single-request stream (stream_generate) and the multi-request scheduler (batch_loop) both feed it
    their picks: they stop at the same place and emit the same text by construction.

        answer = Answer(len(prompt), max_tokens, stop, vocab=expert, n_ctx=expert.n_ctx)
        ev = answer.add(step, n_past)     # the Event to emit (None for the terminating EOS)
        if answer.reason: final = answer.finish(); result = answer.result()
    """

    def __init__(self, prompt_tokens: int, max_tokens: int, stop: list[str], vocab, n_ctx: int):
        self.vocab, self.max_tokens, self.n_ctx = vocab, max_tokens, n_ctx  # vocab: eos_ids, token_bytes
        self.text = TextStream(stop)
        self.stats = Stats(prompt_tokens=prompt_tokens)
        self.tokens: list[int] = []
        self.pieces: list[str] = []
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        self.reason: tuple[str, str] | None = ("length", "max_tokens") if max_tokens <= 0 else None
        self._final: Event | None = None

    def add(self, step: Step, n_past: int) -> Event | None:
        """Count one pick (n_past: positions the expert holds now); the Event to emit, None for the terminating
        EOS. Sets `reason` (finish_reason, stopped_by) when the answer is complete."""
        if self.t_first is None:
            self.t_first = time.perf_counter()
        st = self.stats
        st.picks += 1
        st.changed += step.changed
        st.amateur_skipped += step.skipped
        st.forced += step.forced
        st.overlap_s += step.overlap_s
        if step.token in self.vocab.eos_ids:
            self.reason = ("stop", "eos")
            return None
        st.completion_tokens += 1
        delta, hit = self.text.add(self.vocab.token_bytes(step.token))
        self.pieces.append(delta)
        self.tokens.append(step.token)
        if hit:
            self.reason = ("stop", "stop_string")
        elif st.completion_tokens >= self.max_tokens:
            self.reason = ("length", "max_tokens")
        elif n_past >= self.n_ctx:
            self.reason = ("length", "context_full")
        return Event(delta, step.token, step.changed, step.skipped, explain=step.explain)

    def finish(self) -> Event:
        """The final Event (once): text held back for a possible stop string (unless a stop string ended the
        answer), finish_reason, stopped_by, and the Stats with their timings."""
        if self._final is None:
            reason = self.reason or ("length", "max_tokens")
            st, t_end = self.stats, time.perf_counter()
            st.total_s = t_end - self.t0
            st.ttft_s = (self.t_first if self.t_first is not None else t_end) - self.t0
            st.decode_s = t_end - self.t_first if self.t_first is not None else 0.0
            tail = self.text.flush() if reason[1] != "stop_string" else ""
            self.pieces.append(tail)
            self._final = Event(tail, None, finish_reason=reason[0], stopped_by=reason[1], stats=st)
        return self._final

    def result(self) -> Result:
        final, st = self.finish(), self.stats
        return Result("".join(self.pieces), list(self.tokens), final.finish_reason, final.stopped_by,
                      st.prompt_tokens, st.completion_tokens, st.changed, st)


class TextStream:
    """Bytes in, text out: holds incomplete UTF-8 sequences and any tail that may begin a stop string."""

    def __init__(self, stop: list[str]):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = stop
        self._held = ""

    def add(self, data: bytes) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        held = self._held + self._utf8.decode(data)
        if not self._stop:
            self._held = ""
            return held, False
        cut = min((i for i in (held.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return held[:cut], True
        keep = _stop_prefix_len(held, self._stop)
        self._held = held[len(held) - keep:] if keep else ""
        return held[:len(held) - keep], False

    def flush(self) -> str:
        out = self._held + self._utf8.decode(b"", final=True)
        self._held = ""
        return out


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
