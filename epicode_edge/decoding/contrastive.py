"""Contrastive decoding (Li et al. 2023, as used by EpiCoDe): the method in a page of pure functions.

    le = log_softmax(expert_logits)            la = log_softmax(amateur_logits)
    keep v  iff  le[v] >= log(alpha) + max(le)                      (plausibility mask)
    s[v] = (1 + lam) * le[v] - lam * la[v]  on kept v,  -inf elsewhere

`contrastive_scores` is the definition over the full vocabulary (the reference). The decoding loop uses the
candidate form: `plausible_ids` (the mask is usually a handful of tokens) and `candidate_scores` on those ids
only, with no full-vocabulary sort. Both are exact:

- the mask is shift invariant, so it is computed on the raw logits (`x >= max(x) + log(alpha)`), which is the
  same set as on log-probs without the rounding of subtracting the log-normaliser;
- with `normalize=False` the candidate scores are `(1 + lam) * x - lam * y`, which differ from the paper's
  scores by one constant for all candidates: greedy picks and every softmax-based sampler (temperature,
  top-k, top-p, min-p) are unchanged; `normalize=True` gives the paper's values (needed by processors that are
  not shift invariant, such as the sign-aware repetition penalty).
"""

from __future__ import annotations

import math

import numpy as np

from ..defaults import MAX_LAMBDA
from ..errors import ParameterError


def check_lam(lam: float) -> float:
    """lambda as a float: finite, in [0, MAX_LAMBDA] (defaults.py)."""
    if (not isinstance(lam, (int, float)) or isinstance(lam, bool) or not math.isfinite(lam) or lam < 0
            or lam > MAX_LAMBDA):
        raise ParameterError(f"lambda must be a finite number >= 0 and at most {MAX_LAMBDA:g}, got {lam!r}")
    return float(lam)


def check_alpha(alpha: float) -> float:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not (0 < alpha <= 1):
        raise ParameterError(f"alpha must be in (0, 1], got {alpha!r}")
    return float(alpha)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log-probabilities of a logits vector (V,) -> (V,), float32, stable."""
    x = np.asarray(logits, dtype=np.float32)
    return x - logsumexp(x)


def logsumexp(x: np.ndarray) -> np.float32:
    m = x.max()
    return m + np.log(np.exp(x - m).sum(dtype=np.float32))


def plausible_ids(expert_logits: np.ndarray, alpha: float) -> np.ndarray:
    """Token ids the plausibility mask keeps, ascending: le[v] >= log(alpha) + max(le).  (V,) -> (K,) int64.

    Works on logits or log-probs alike (the test is shift invariant). Never empty: the argmax is always kept.
    """
    x = expert_logits
    return (x >= x.max() + math.log(alpha)).nonzero()[0]


def plausibility_mask(le: np.ndarray, alpha: float) -> np.ndarray:
    """Boolean mask (V,) of the kept tokens, the paper's form on log-probs."""
    check_alpha(alpha)
    return le >= math.log(alpha) + le.max()


def contrastive_scores(le: np.ndarray, la: np.ndarray, lam: float, alpha: float) -> np.ndarray:
    """The paper's scores over the full vocabulary: (1 + lam) * le - lam * la on kept tokens, -inf elsewhere.

    le, la: log-probs (V,) of expert and amateur.  Returns (V,) float64 (as candidate_scores).
    """
    lam, alpha = check_lam(lam), check_alpha(alpha)
    if le.shape != la.shape:
        raise ParameterError(f"expert and amateur logits differ in shape: {le.shape} vs {la.shape}")
    keep = plausibility_mask(le, alpha)
    s = np.full(le.shape, -np.inf, dtype=np.float64)
    s[keep] = (1 + lam) * le[keep].astype(np.float64) - lam * la[keep].astype(np.float64)
    return s


def candidate_scores(expert_logits: np.ndarray, amateur_logits: np.ndarray | None, ids: np.ndarray,
                     lam: float, normalize: bool = False, amateur_on_ids: bool = False) -> np.ndarray:
    """Contrastive scores of the candidate ids only.  (V,), (V,), (K,) -> (K,) float64.

    normalize=False: (1 + lam) * x - lam * y on raw logits (paper's scores minus one constant).
    normalize=True: the paper's values, with log-softmax over the full vocabulary.
    amateur_on_ids: amateur_logits are (K,), the amateur's logits of ids only (normalize=False only: the
    log-normaliser needs the whole vocabulary).
    With lam == 0 the amateur is not read (it may be None): the scores are the expert's own.
    In float64 (K values only): in float32, (1 + lam) * x and lam * y overflow for lam near 1e38 and cancel
    each other's digits long before (at lam 1e6 float32 keeps about 1 unit of the difference), so the picks
    stop being the formula's. In float64, with float32 logits and lam <= MAX_LAMBDA (defaults.py), the scores
    are finite and the picks those of the exact formula (test: tests/test_hostile_round2.py).
    """
    x = expert_logits
    xe = (x[ids] - logsumexp(x) if normalize else x[ids]).astype(np.float64)  # (K,)
    if lam == 0:
        return xe
    y = amateur_logits
    if amateur_on_ids:
        if normalize or y.shape != ids.shape:
            raise ParameterError(f"amateur logits of the candidates: need normalize=False and shape {ids.shape}, "
                                 f"got normalize={normalize} and shape {y.shape}")
        return (1 + lam) * xe - lam * y.astype(np.float64)
    ya = (y[ids] - logsumexp(y) if normalize else y[ids]).astype(np.float64)  # (K,)
    return (1 + lam) * xe - lam * ya
