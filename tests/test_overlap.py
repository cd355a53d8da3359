"""Overlap: the amateur's forward runs in a worker thread beside the expert's; outputs equal the naive loop."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from rt_models import EOS, N_THREADS, VOCAB, ScriptBackend, bundle_dir

from epicode_edge.decoding.loop import stream_generate
from epicode_edge.decoding.sampling import make_sampler
from epicode_edge.errors import BackendError, ParameterError

PROMPTS = ["The quick brown fox", "Question: what is 17 + 25? Answer:"]


class ThreadedScript(ScriptBackend):
    """A scripted engine that may run from two threads, and records the thread of each forward."""

    concurrent = True

    def __init__(self, fn, **kw):
        super().__init__(fn, **kw)
        self.threads = []

    def _forward(self, ids):
        self.threads.append(threading.current_thread().name)
        return super()._forward(ids)


def _cycle(seq):
    logits = np.zeros(VOCAB, dtype=np.float32)
    logits[97 + len(seq) % 3] = 5.0
    logits[97 + (len(seq) + 1) % 3] = 4.9  # two plausible tokens: the amateur decides
    return logits


def _amateur_fn(seq):
    logits = np.zeros(VOCAB, dtype=np.float32)
    logits[97 + len(seq) % 3] = 8.0
    return logits


def _run(e, a, prompt, **kw):
    for b in (e, a):
        b.truncate(0)
    events = list(stream_generate(e, a, prompt, lam=0.5, alpha=0.1, max_tokens=kw.pop("max_tokens", 6), **kw))
    return [ev.token for ev in events[:-1]], events[-1].stats


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from epicode_edge.backends.llamacpp import LlamaCppBackend

    b = bundle_dir(tmp_path_factory)
    models = [LlamaCppBackend(b / f"gguf/{r}-Q8_0.gguf", n_ctx=256, n_threads=N_THREADS) for r in ("expert", "amateur")]
    yield models
    for m in models:
        m.close()


def test_the_amateur_runs_in_a_worker_thread_and_sees_every_token():
    e, a = ThreadedScript(_cycle), ThreadedScript(_amateur_fn)
    naive, _ = _run(e, a, [1, 2], lazy=False)
    e.threads.clear(), a.threads.clear()
    got, st = _run(e, a, [1, 2], overlap=True)
    assert got == naive
    assert set(e.threads) == {threading.current_thread().name}
    assert a.threads and all(t.startswith("epicode-amateur") for t in a.threads)
    assert st.amateur_forwards == st.expert_forwards == st.picks  # prompt prefill + one step per later pick
    assert a.n_past == e.n_past
    assert not any(t.name.startswith("epicode-amateur") for t in threading.enumerate())  # worker joined


def test_overlap_needs_a_concurrent_engine_and_an_amateur_in_use():
    e, a = ScriptBackend(_cycle), ScriptBackend(_amateur_fn)  # not concurrent: the sequential path
    assert _run(e, a, [1, 2], overlap=True)[0] == _run(e, a, [1, 2], lazy=False)[0]
    e, a = ThreadedScript(_cycle), ThreadedScript(_amateur_fn)
    for b in (e, a):
        b.truncate(0)
    list(stream_generate(e, a, [1, 2], lam=0.0, alpha=0.1, max_tokens=4, overlap=True))
    assert a.n_past == 0 and not a.threads  # lambda = 0: the amateur is untouched


def test_an_error_in_the_worker_propagates_after_both_forwards():
    calls = {"n": 0}

    def broken(seq):
        calls["n"] += 1
        if calls["n"] == 3:
            raise BackendError("amateur: llama_decode failed with code 1")
        return _amateur_fn(seq)

    e, a = ThreadedScript(_cycle), ThreadedScript(broken)
    with pytest.raises(BackendError, match="llama_decode failed"):
        _run(e, a, [1, 2], overlap=True)
    assert e.n_past == 4 and a.n_past == 3 and a._dirty  # expert stepped; the amateur's failed step not counted
    got, _ = _run(e, a, [1, 2], overlap=True)  # both usable afterwards
    assert got == _run(e, a, [1, 2], lazy=False)[0]


def test_ctrl_c_in_the_main_thread_waits_for_the_amateur_and_leaves_usable_caches():
    calls = {"n": 0}
    amateur_done = []

    def slow_amateur(seq):
        import time

        time.sleep(0.05)
        amateur_done.append(len(seq))
        return _amateur_fn(seq)

    def interrupted(seq):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return _cycle(seq)

    e, a = ThreadedScript(interrupted), ThreadedScript(slow_amateur)
    with pytest.raises(KeyboardInterrupt):
        _run(e, a, [1, 2], overlap=True)
    assert amateur_done[-1] == 4  # the amateur's third forward finished before Ctrl-C propagated
    assert e.n_past == 3 and e._dirty and a.n_past == 4
    e.fn = _cycle
    got, _ = _run(e, a, [1, 2], overlap=True)
    assert got == _run(e, a, [1, 2], lazy=False)[0]


@pytest.mark.parametrize("sampling", [{}, {"temp": 0.8, "seed": 1}, {"temp": 1.2, "seed": 7, "top_p": 0.9}])
def test_overlap_is_bit_identical_to_the_naive_loop_on_llamacpp(engine, sampling):
    expert, amateur = engine
    for text in PROMPTS:
        prompt = expert.tokenize(text)
        runs = {}
        for overlap in (False, True):
            calls = []
            forward = amateur._forward
            amateur._forward = lambda ids, f=forward, c=calls: c.append((len(ids), f(ids).copy())) or c[-1][1]
            try:
                tokens, st = _run(expert, amateur, prompt, max_tokens=24, lazy=overlap, overlap=overlap,
                                  sampler=make_sampler(**{"temp": 0.0, **sampling}))
            finally:
                del amateur._forward
            runs[overlap] = tokens, calls, st
        (naive, naive_calls, _), (got, calls, st) = runs[False], runs[True]
        assert got == naive
        assert [n for n, _ in calls] == [n for n, _ in naive_calls]
        assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(calls, naive_calls))
        assert st.overlap_s != 0.0 and st.loop_overhead_s >= 0


def test_runtime_setting(tmp_path_factory):
    from epicode_edge.runtime import AUTO_OVERLAP, Settings, load

    with pytest.raises(ParameterError, match="overlap must be"):
        Settings().updated(overlap="yes")
    with pytest.raises(ParameterError, match="candidate_head must be"):
        Settings().updated(candidate_head=1)
    b = bundle_dir(tmp_path_factory)
    with load(b, quant="Q8_0", n_ctx=256) as rt:  # threads not given: each model gets half the cores
        loaded = rt.expert.threads
        naive = rt.generate("Hello", raw=True, max_tokens=8, lazy=False, overlap=False)
        got = rt.generate("Hello", raw=True, max_tokens=8, overlap=True)
        half = max(1, (__import__("os").cpu_count() or 1) // 2)
        assert rt.expert.threads == rt.amateur.threads == (half, half)
        assert got.tokens == naive.tokens
        assert rt.overlaps(rt.settings(overlap=True)) and not rt.overlaps(rt.settings(overlap=True, lam=0.0))
        rt.generate("Hello", raw=True, max_tokens=2, overlap=False)
        assert rt.expert.threads == loaded  # restored
        cores = __import__("os").cpu_count() or 1
        assert rt.overlaps() == (AUTO_OVERLAP and cores >= 2)  # auto: llama.cpp on a CPU with >= 2 cores
    with load(b, quant="Q8_0", n_ctx=256, n_threads=cores) as rt:  # given threads would oversubscribe: auto off
        assert not rt.overlaps() and rt.overlaps(rt.settings(overlap=True))
