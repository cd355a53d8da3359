"""decoding/sampling.py: greedy, seeded sampling with its filters, one draw per pick, repetition penalty."""

import numpy as np
import pytest

from epicode_edge.decoding.sampling import (apply_min_p, apply_top_k, apply_top_p, greedy, make_logits_processors,
                                            make_repetition_penalty, make_sampler, pick_with)
from epicode_edge.errors import ParameterError


def test_greedy_is_argmax_first_on_ties():
    assert greedy(np.array([0.0, 3.0, 3.0, -np.inf])) == (1,)
    assert make_sampler(temp=0) is greedy
    assert greedy(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == (0, 1)


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    s = np.log(np.array([0.3, 0.3, 0.4]))
    a = [make_sampler(temp=1.0, seed=5)(s)[0] for _ in range(1)]
    s1, s2, s3 = make_sampler(temp=1.0, seed=5), make_sampler(temp=1.0, seed=5), make_sampler(temp=1.0, seed=6)
    r1 = [s1(s)[0] for _ in range(50)]
    assert r1 == [s2(s)[0] for _ in range(50)]
    assert r1 != [s3(s)[0] for _ in range(50)]
    assert a[0] == r1[0]


def test_one_draw_per_call_whatever_the_length():
    """A forced pick (one candidate) consumes randomness like any other pick: lazy and naive loops agree."""
    v = np.log(np.array([0.2, 0.5, 0.3]))
    s1, s2 = make_sampler(temp=0.8, seed=1), make_sampler(temp=0.8, seed=1)
    picks1 = [s1(np.array([0.0]))[0], s1(v)[0], s1(np.array([1.0, -np.inf]))[0], s1(v)[0]]
    picks2 = [s2(np.array([5.0]))[0], s2(v)[0], s2(np.array([-np.inf, 2.0]))[0], s2(v)[0]]
    assert picks1[0] == picks2[0] == 0 and picks1[2] == 0 and picks2[2] == 1
    assert picks1[1] == picks2[1] and picks1[3] == picks2[3]
    rng = np.random.default_rng(1)
    u = [rng.random() for _ in range(4)]
    assert picks1[1] == pick_with(v, u[1], 0.8) and picks1[3] == pick_with(v, u[3], 0.8)


def test_two_vectors_share_one_draw():
    v = np.log(np.array([0.25, 0.25, 0.25, 0.25]))
    s = make_sampler(temp=1.0, seed=3)
    for _ in range(20):
        a, b = s(v, v.copy())
        assert a == b


def test_sampling_follows_softmax_of_scores_over_temp():
    scores = np.array([1.0, 0.0, -1.0, -np.inf])
    for temp in (1.0, 0.5):
        s = make_sampler(temp=temp, seed=0)
        counts = np.bincount([s(scores)[0] for _ in range(20000)], minlength=4) / 20000
        p = np.exp(scores / temp)
        p /= p.sum()
        np.testing.assert_allclose(counts, p, atol=0.015)
        assert counts[3] == 0


def test_filters():
    logp = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert np.isfinite(apply_top_p(logp, 0.5)).tolist() == [True, False, False, False]
    assert np.isfinite(apply_top_p(logp, 0.6)).tolist() == [True, True, False, False]
    assert np.isfinite(apply_top_p(logp, 1.0)).all()
    assert np.isfinite(apply_min_p(logp, 0.5)).tolist() == [True, True, False, False]
    assert np.isfinite(apply_top_k(logp, 2)).tolist() == [True, True, False, False]
    for kw in ({"top_k": 1}, {"top_p": 0.1}, {"min_p": 1.0}):
        s = make_sampler(temp=5.0, seed=0, **kw)
        assert {s(logp)[0] for _ in range(50)} == {0}


def test_filters_work_on_unnormalised_scores():
    s = make_sampler(temp=1.0, seed=0, top_k=2)
    scores = np.array([10.0, 9.0, 8.0, -np.inf]) + 100.0
    assert {s(scores)[0] for _ in range(200)} == {0, 1}


@pytest.mark.parametrize("kw, msg", [
    ({"temp": -0.1}, "temp must be a finite number >= 0"),
    ({"temp": float("nan")}, "temp must be"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
    ({"seed": -3}, "seed must be an integer >= 0"),
    ({"seed": "x"}, "seed must be"),
])
def test_bad_sampling_parameters(kw, msg):
    with pytest.raises(ParameterError, match=msg):
        make_sampler(**{"temp": 1.0, **kw})


def test_repetition_penalty_is_sign_aware_on_recent_tokens():
    proc = make_repetition_penalty(2.0, context_size=2)
    ids = np.array([3, 5, 7, 9])
    scores = np.array([-1.0, 4.0, 2.0, -3.0])
    out = proc([9, 1, 3, 5], ids, scores)  # last 2 tokens: 3 and 5
    np.testing.assert_allclose(out, [-2.0, 2.0, 2.0, -3.0])
    np.testing.assert_allclose(scores, [-1.0, 4.0, 2.0, -3.0])  # input untouched
    np.testing.assert_allclose(proc([], ids, scores), scores)


def test_logits_processors_factory():
    assert make_logits_processors() == []
    assert make_logits_processors(1.0) == []
    assert len(make_logits_processors(1.3)) == 1
    with pytest.raises(ParameterError, match="repetition_penalty must be a number > 0"):
        make_logits_processors(0.0)
    with pytest.raises(ParameterError, match="repetition_context_size"):
        make_logits_processors(1.2, 0)
