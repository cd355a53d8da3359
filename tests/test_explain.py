"""Per-token explanations (decoding/explain.py) on the real llama.cpp engine: the candidates, log-probs and
scores the loops report equal a recomputation with decoding/contrastive.py from the two models' full logits
of the same positions, in every loop (lazy, naive, overlapped, batched); off, nothing of it runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from epicode_edge.cli import main
from epicode_edge.decoding import batch_loop, loop
from epicode_edge.decoding.contrastive import contrastive_scores, log_softmax
from epicode_edge.errors import ParameterError
from rt_models import N_THREADS, bundle_dir, f32_runtime

PROMPT = "What is 17 + 25?"
LAM, ALPHA = 2.0, 0.2  # on the tiny bundle: changed picks, forced (skipped) picks and several candidates


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    r = f32_runtime(tmp_path_factory)
    yield r
    r.close()


def _full_logits(backend, prompt: list[int], answer: list[int]) -> np.ndarray:
    """(T, V) the model's full logits at each pick's position: the prompt in one prefill, then one step per
    token (the naive loop's engine calls)."""
    backend.truncate(0)
    xs = [backend.prefill(prompt).copy()]  # the engines may hand out their own buffer
    for t in answer[:-1]:
        xs.append(backend.step(t).copy())
    backend.truncate(0)
    return np.stack(xs)


def _check_against_full_logits(rt, prompt, events, lam, alpha, top_n, amateur_atol=1e-5):
    toks = [ev for ev in events if not ev.final]
    answer = [ev.token for ev in toks]
    X = _full_logits(rt.expert, prompt, answer)  # (T, V)
    Y = _full_logits(rt.amateur, prompt, answer)  # (T, V)
    for t, ev in enumerate(toks):
        exp = ev.explain
        le, la = log_softmax(X[t]), log_softmax(Y[t])  # (V,)
        ref = contrastive_scores(le, la, lam, alpha)  # (V,) -inf outside the mask
        kept = np.flatnonzero(np.isfinite(ref))
        assert exp.candidates == kept.tolist(), t
        np.testing.assert_allclose(exp.expert_logprobs, le[kept], rtol=1e-6, atol=1e-6)
        assert exp.logprob == pytest.approx(float(le[ev.token]), abs=1e-6)
        top = np.argsort(-le, kind="stable")[:top_n]
        assert [i for i, _ in exp.top_logprobs] == top.tolist()
        np.testing.assert_allclose([lp for _, lp in exp.top_logprobs], le[top], atol=1e-6)
        assert exp.skipped == ev.skipped and exp.token == ev.token and exp.changed == ev.changed
        if exp.skipped:  # the amateur was not read: no numbers of its own, no scores (lam > 0)
            assert exp.amateur_logprobs is None and exp.scores is None and len(kept) == 1
        else:
            np.testing.assert_allclose(exp.amateur_logprobs, la[kept], rtol=1e-6, atol=amateur_atol)
            np.testing.assert_allclose(exp.scores, ref[kept], rtol=1e-6, atol=max(1e-5, lam * amateur_atol) if amateur_atol > 1e-5 else 1e-5)
            assert ev.token == kept[int(np.argmax(ref[kept]))]  # greedy: the best score won
        assert exp.own == kept[int(np.argmax(le[kept]))]  # the expert alone: its most likely candidate
    return toks


@pytest.mark.parametrize("mode", [dict(lazy=True, catch_up="steps", overlap=False), dict(lazy=False, overlap=False),
                                  dict(overlap=True), dict(lazy=True, catch_up="batch", overlap=False,
                                                           candidate_head=True)])
def test_explain_equals_recomputation_from_full_logits(rt, mode):
    prompt = rt.encode(PROMPT)
    s = rt.settings(max_tokens=20, lam=LAM, alpha=ALPHA, explain=True, top_logprobs=4, **mode)
    rt.expert.truncate(0), rt.amateur.truncate(0)  # no cache reuse: the same engine calls as the recomputation
    events = list(rt.stream_ids(prompt, s))
    # a batched catch-up feeds the amateur several tokens in one decode, whose CPU matrix kernel sums in another
    # order than the reference's one-token steps (1.3e-5 seen on an AVX-512 EPYC, F32 weights)
    atol = 1e-4 if mode.get("catch_up") == "batch" else 1e-5
    toks = _check_against_full_logits(rt, prompt, events, LAM, ALPHA, 4, amateur_atol=atol)
    assert any(ev.changed for ev in toks) and any(len(ev.explain.candidates) > 1 for ev in toks)
    if mode.get("lazy") and not mode.get("overlap"):
        assert any(ev.skipped for ev in toks)  # forced picks: the amateur said nothing, and the data says so
    # explain changes nothing of the answer
    plain = list(rt.stream_ids(prompt, s.updated(explain=False, top_logprobs=0)))
    assert [ev.token for ev in plain] == [ev.token for ev in events]
    assert [ev.text for ev in plain] == [ev.text for ev in events]


def test_batched_loop_explains_the_same(rt):
    prompts = [rt.encode(PROMPT), rt.encode("Name a colour.")]
    s = rt.settings(max_tokens=12, lam=LAM, alpha=ALPHA, explain=True, top_logprobs=2)
    seen: dict = {0: [], 1: []}
    done = dict(rt.stream_many(((i, p, s) for i, p in enumerate(prompts)), parallel=2,
                               on_event=lambda k, ev: seen[k].append(ev)))
    for i, p in enumerate(prompts):
        single = [ev for ev in rt.stream_ids(p, s) if not ev.final]
        assert [ev.token for ev in seen[i]] == done[i].tokens == [ev.token for ev in single]
        for a, b in zip(seen[i], single):
            assert a.explain.candidates == b.explain.candidates and a.explain.skipped == b.explain.skipped
            np.testing.assert_allclose(a.explain.expert_logprobs, b.explain.expert_logprobs, atol=1e-4)
            if b.explain.scores is not None:
                np.testing.assert_allclose(a.explain.scores, b.explain.scores, atol=1e-4)


def test_finetuned_alone_explains_its_logprobs(rt):
    prompt = rt.encode(PROMPT)
    rt.amateur.truncate(0)
    events = [ev for ev in rt.compare_ids(prompt, rt.settings(max_tokens=8, explain=True, top_logprobs=3))
              if not ev.final]
    Y = _full_logits(rt.amateur, prompt, [ev.token for ev in events])
    for t, ev in enumerate(events):
        la = log_softmax(Y[t])
        assert ev.explain.logprob == pytest.approx(float(la[ev.token]), abs=1e-6)
        assert ev.explain.top_logprobs[0][0] == ev.token == int(np.argmax(la))  # greedy
        assert ev.explain.amateur_logprobs is None and not ev.changed


def test_explain_off_computes_nothing(rt, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("explain_pick ran with explain off")

    monkeypatch.setattr(loop, "explain_pick", boom)
    monkeypatch.setattr(batch_loop, "explain_pick", boom)
    prompt = rt.encode(PROMPT)
    for mode in (dict(overlap=False), dict(overlap=True), dict(lazy=False, overlap=False)):
        events = list(rt.stream_ids(prompt, rt.settings(max_tokens=6, lam=LAM, alpha=ALPHA, **mode)))
        assert all(ev.explain is None for ev in events)
    list(rt.stream_many([(0, prompt, rt.settings(max_tokens=6, lam=LAM))], parallel=1))
    with pytest.raises(AssertionError, match="explain_pick ran"):  # the patch is live: on, it would run
        list(rt.stream_ids(prompt, rt.settings(max_tokens=2, lam=LAM, explain=True, overlap=False)))


def test_explain_settings_are_checked(rt):
    for bad in (-1, 21, 1.5, True, "3"):
        with pytest.raises(ParameterError, match="top_logprobs"):
            rt.settings(top_logprobs=bad)
    with pytest.raises(ParameterError, match="explain must be"):
        rt.settings(explain="yes")


def test_generate_explain_prints_json_lines(tmp_path_factory):
    b = str(bundle_dir(tmp_path_factory))
    res = CliRunner().invoke(main, ["generate", b, PROMPT, "--max-tokens", "8", "--lambda", str(LAM),
                                    "--alpha", str(ALPHA), "--explain", "--top-logprobs", "2", "--quant", "F32",
                                    "--threads", str(N_THREADS)])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    *toks, final = lines
    assert len(toks) == final["completion_tokens"] == 8 and final["finish_reason"] == "length"
    assert final["changed_tokens"] == sum(t["changed"] for t in toks)
    assert "".join(t["text"] for t in toks) + final["text"] == final["answer"]
    for t in toks:
        assert t["candidates"][0]["score"] is None or t["candidates"][0]["score"] == max(
            c["score"] for c in t["candidates"])
        assert [c["picked"] for c in t["candidates"]].count(True) <= 1 and len(t["top_logprobs"]) == 2
        assert t["changed"] == (t["token"] != t["own"])


def test_explain_on_mlx_equals_recomputation(tmp_path_factory):
    """MLX (CPU): the candidate head is off when explaining, so the amateur's log-probs are over the whole
    vocabulary there too."""
    from epicode_edge.runtime import load

    r = load(bundle_dir(tmp_path_factory), backend="mlx", n_ctx=256)
    try:
        prompt = r.encode(PROMPT)
        s = r.settings(max_tokens=8, lam=LAM, alpha=ALPHA, explain=True, top_logprobs=2, catch_up="steps")
        toks = _check_against_full_logits(r, prompt, list(r.stream_ids(prompt, s)), LAM, ALPHA, 2)
        assert any(not ev.skipped and len(ev.explain.candidates) > 1 for ev in toks)
    finally:
        r.close()
