"""Picking a token from scores: greedy, or temperature / top-p / min-p / top-k sampling, seeded.

Factories return closures, as mlx-lm's sample_utils does:

    sampler = make_sampler(temp=0.7, top_p=0.9, seed=1)
    pick, = sampler(scores)              # index into scores
    pick, own = sampler(scores, other)   # the SAME random draw applied to a second score vector

A sampler draws exactly one uniform number per call when temp > 0 (none when greedy), whatever the length of
the scores: a forced pick (one candidate) consumes randomness exactly like any other pick, so paths that skip
work for forced picks stay in step with the naive loop. Sampling is inverse-CDF over the scores in the order
given (the loop passes candidates in ascending token id), so the result is a pure function of (scores, draw).

Scores may hold -inf (masked tokens): those are never picked. Filters apply in mlx-lm's order
(top-p, min-p, top-k) to the scores' probabilities, then temperature.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from ..errors import ParameterError

Sampler = Callable[..., tuple]
LogitsProcessor = Callable[[Sequence[int], np.ndarray, np.ndarray], np.ndarray]


def _number(x) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool) and math.isfinite(x)


def check_sampling(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seed=None) -> None:
    """Raises ParameterError naming the first parameter out of range."""
    if not _number(temp) or temp < 0:
        raise ParameterError(f"temp must be a finite number >= 0, got {temp!r}")
    if not _number(top_p) or not (0 < top_p <= 1):
        raise ParameterError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 0:
        raise ParameterError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not _number(min_p) or not (0 <= min_p <= 1):
        raise ParameterError(f"min_p must be in [0, 1], got {min_p!r}")
    if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0):
        raise ParameterError(f"seed must be an integer >= 0 or None, got {seed!r}")


def greedy(*scores: np.ndarray) -> tuple:
    """argmax of each score vector (first index on ties, as np.argmax)."""
    if len(scores) == 1:
        return (int(scores[0].argmax()),)
    return tuple(int(s.argmax()) for s in scores)


def make_sampler(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 seed: int | None = None) -> Sampler:
    """A sampler over score vectors: greedy when temp == 0, else filtered, tempered, seeded sampling."""
    check_sampling(temp, top_p, top_k, min_p, seed)
    if temp == 0:
        return greedy
    rng = np.random.default_rng(seed)

    def sample(*scores: np.ndarray) -> tuple:
        u = rng.random()  # one draw per call, shared by all vectors
        return tuple(pick_with(s, u, temp, top_p, top_k, min_p) for s in scores)

    return sample


def pick_with(scores: np.ndarray, u: float, temp: float, top_p: float = 1.0, top_k: int = 0,
              min_p: float = 0.0) -> int:
    """Inverse-CDF pick with uniform u in [0, 1) from softmax(filtered(scores) / temp).  (K,) -> index."""
    s = np.asarray(scores, dtype=np.float64)
    logp = s - s.max()
    logp = logp - np.log(np.exp(logp).sum())  # (K,) log-probs, -inf for masked
    if top_p < 1:
        logp = apply_top_p(logp, top_p)
    if min_p > 0:
        logp = apply_min_p(logp, min_p)
    if 0 < top_k < len(logp):
        logp = apply_top_k(logp, top_k)
    z = logp / temp
    p = np.exp(z - z.max())  # (K,)
    c = np.cumsum(p)
    i = int(np.searchsorted(c, u * c[-1], side="right"))
    i = min(i, len(c) - 1)
    while p[i] == 0:  # u * total landed on a run of zero-probability entries' right edge: step back
        i -= 1
    return i


def apply_top_p(logp: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    order = np.argsort(-logp, kind="stable")  # (K,) most likely first
    p = np.exp(logp[order])
    before = np.cumsum(p) - p  # mass strictly before each token
    out = np.full_like(logp, -np.inf)
    keep = order[before < top_p]
    out[keep] = logp[keep]
    return out


def apply_min_p(logp: np.ndarray, min_p: float) -> np.ndarray:
    """Keep tokens with p >= min_p * p_max (the most likely token always stays)."""
    return np.where(logp >= logp.max() + math.log(min_p), logp, -np.inf)


def apply_top_k(logp: np.ndarray, top_k: int) -> np.ndarray:
    """Keep the top_k most likely tokens."""
    drop = np.argpartition(-logp, top_k)[top_k:]
    out = logp.copy()
    out[drop] = -np.inf
    return out


MAX_REPETITION_PENALTY = 1e6  # penalties in [1 / it, it]: scores (at most ~1e45, float64) times it stay finite


def check_repetition_penalty(penalty) -> float:
    m = MAX_REPETITION_PENALTY
    if not _number(penalty) or not (1 / m <= penalty <= m):
        raise ParameterError(f"repetition_penalty must be a number > 0, from {1 / m:g} to {m:g}, got {penalty!r}")
    return float(penalty)


def make_repetition_penalty(penalty: float, context_size: int = 20) -> LogitsProcessor:
    """Sign-aware multiplicative penalty on tokens seen in the last context_size tokens (CTRL paper, as
    mlx-lm's make_repetition_penalty and llama.cpp's repeat_penalty): s < 0 -> s * penalty, else s / penalty.

    The processor takes (tokens so far, ids (K,), scores (K,)) and returns new scores (K,).
    """
    check_repetition_penalty(penalty)
    if not isinstance(context_size, int) or isinstance(context_size, bool) or context_size < 1:
        raise ParameterError(f"repetition_context_size must be an integer >= 1, got {context_size!r}")

    def repetition_penalty(tokens: Sequence[int], ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        recent = tokens[-context_size:]
        if len(recent) == 0:
            return scores
        hit = np.isin(ids, np.asarray(recent))  # (K,)
        if not hit.any():
            return scores
        s = scores.copy()
        s[hit] = np.where(s[hit] < 0, s[hit] * penalty, s[hit] / penalty)
        return s

    return repetition_penalty


def make_logits_processors(repetition_penalty: float | None = None,
                           repetition_context_size: int = 20) -> list[LogitsProcessor]:
    """The processors to apply to the candidate scores before sampling (empty when none is asked for)."""
    if repetition_penalty is None or repetition_penalty == 1.0:
        if repetition_penalty is not None:
            check_repetition_penalty(repetition_penalty)
        return []
    return [make_repetition_penalty(repetition_penalty, repetition_context_size)]
