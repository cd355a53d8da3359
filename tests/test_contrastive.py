"""decoding/contrastive.py: the paper's formulas, and the candidate form the loop uses, against each other."""

import math

import numpy as np
import pytest

from epicode_edge.decoding.contrastive import (candidate_scores, check_alpha, check_lam, contrastive_scores,
                                               log_softmax, plausibility_mask, plausible_ids)
from epicode_edge.errors import ParameterError


def ref_log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def logits(seed, v=1000, scale=3.0):
    return (np.random.default_rng(seed).standard_normal(v) * scale).astype(np.float32)


def test_log_softmax_normalises_and_is_shift_invariant():
    x = logits(0)
    le = log_softmax(x)
    assert le.dtype == np.float32
    assert math.isclose(np.exp(le.astype(np.float64)).sum(), 1.0, rel_tol=1e-5)
    np.testing.assert_allclose(le, ref_log_softmax(x), atol=1e-5)
    np.testing.assert_allclose(log_softmax(x + 123.0), le, atol=1e-4)


def test_large_logits_do_not_overflow():
    le = log_softmax(np.array([1e4, 1e4 - 1, -1e4], dtype=np.float32))
    assert np.all(np.isfinite(le[:2])) and le.argmax() == 0


@pytest.mark.parametrize("alpha", [1e-6, 0.01, 0.1, 0.5, 0.9, 1.0])
def test_candidate_ids_are_the_paper_mask(alpha):
    for seed in range(5):
        x = logits(seed)
        le = log_softmax(x)
        expected = np.flatnonzero(le >= math.log(alpha) + le.max())
        np.testing.assert_array_equal(plausible_ids(x, alpha), expected)
        np.testing.assert_array_equal(np.flatnonzero(plausibility_mask(le, alpha)), expected)
        assert x.argmax() in plausible_ids(x, alpha)


def test_mask_keeps_single_token_when_one_dominates_and_ties_at_alpha_one():
    x = np.array([0.0, 10.0, 1.0, 10.0], dtype=np.float32)
    assert plausible_ids(x, 1.0).tolist() == [1, 3]
    assert plausible_ids(np.array([0.0, 10.0, 1.0], dtype=np.float32), 0.1).tolist() == [1]


def test_contrastive_scores_formula_and_minus_inf_outside_the_mask():
    x, y = logits(1), logits(2)
    le, la = log_softmax(x), log_softmax(y)
    lam, alpha = 0.7, 0.05
    s = contrastive_scores(le, la, lam, alpha)
    keep = le >= math.log(alpha) + le.max()
    assert np.all(np.isneginf(s[~keep]))
    np.testing.assert_allclose(s[keep], (1 + lam) * le[keep] - lam * la[keep], rtol=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5, 1.0, 4.0])
def test_candidate_scores_equal_the_full_scores_on_the_candidates(lam):
    for seed in range(5):
        x, y = logits(10 + seed, scale=2.0), logits(20 + seed, scale=2.0)
        ids = plausible_ids(x, 0.01)
        full = contrastive_scores(log_softmax(x), log_softmax(y), lam, 0.01)
        norm = candidate_scores(x, y, ids, lam, normalize=True)
        np.testing.assert_allclose(norm, full[ids], rtol=1e-5, atol=1e-5)
        raw = candidate_scores(x, y, ids, lam, normalize=False)
        shift = norm - raw  # one constant for all candidates: same picks, same softmax
        np.testing.assert_allclose(shift, shift[0], atol=1e-4)
        assert ids[np.argmax(raw)] == ids[np.argmax(norm)] == np.argmax(full)


def test_candidate_scores_from_the_amateurs_candidate_logits_only():
    """amateur_on_ids: the amateur's logits of the ids alone give the same scores as its whole vector
    (normalize=False), and the normalized form, which needs the whole vocabulary, is refused."""
    x, y = logits(5, scale=2.0), logits(6, scale=2.0)
    ids = plausible_ids(x, 0.01)
    assert len(ids) > 1
    np.testing.assert_array_equal(candidate_scores(x, y[ids], ids, 0.5, amateur_on_ids=True),
                                  candidate_scores(x, y, ids, 0.5))
    with pytest.raises(ParameterError, match="amateur logits of the candidates"):
        candidate_scores(x, y[ids], ids, 0.5, normalize=True, amateur_on_ids=True)
    with pytest.raises(ParameterError, match="amateur logits of the candidates"):
        candidate_scores(x, y, ids, 0.5, amateur_on_ids=True)


def test_lambda_zero_is_the_expert_alone_and_never_reads_the_amateur():
    x = logits(3)
    ids = plausible_ids(x, 0.1)
    s = candidate_scores(x, None, ids, 0.0)
    np.testing.assert_array_equal(s, x[ids])
    assert ids[np.argmax(s)] == np.argmax(x)


def test_contrast_can_change_the_pick():
    # expert prefers 0 slightly; the amateur is much more confident about 0 -> contrast favours 1
    x = np.array([2.0, 1.9, -5.0], dtype=np.float32)
    y = np.array([5.0, 0.0, -5.0], dtype=np.float32)
    ids = plausible_ids(x, 0.1)
    assert ids[np.argmax(candidate_scores(x, y, ids, 0.5))] == 1
    assert ids[np.argmax(candidate_scores(x, y, ids, 0.0))] == 0


@pytest.mark.parametrize("alpha", [0, -0.1, 1.5, float("nan"), float("inf"), "0.1", None, True])
def test_bad_alpha(alpha):
    with pytest.raises(ParameterError, match=r"alpha must be in \(0, 1\]"):
        check_alpha(alpha)


@pytest.mark.parametrize("lam", [-0.01, float("nan"), float("inf"), "1", None, False])
def test_bad_lambda(lam):
    with pytest.raises(ParameterError, match="lambda must be a finite number >= 0"):
        check_lam(lam)


def test_scores_validate_their_arguments():
    le = log_softmax(logits(4))
    with pytest.raises(ParameterError, match="alpha"):
        contrastive_scores(le, le, 0.5, 0.0)
    with pytest.raises(ParameterError, match="lambda"):
        contrastive_scores(le, le, -1, 0.1)
    with pytest.raises(ParameterError, match="shape"):
        contrastive_scores(le, le[:-1], 0.5, 0.1)
