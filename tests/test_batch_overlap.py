"""Batched decoding with overlap: the amateur's multi-sequence decode beside the expert's, half the cores each
(decoding/batch_loop.py, Runtime.batch_overlaps). Real llama.cpp models (tests/rt_models.py)."""

from __future__ import annotations

import os
import threading

import pytest
from rt_models import bundle_dir

from epicode_edge.decoding import batch_loop
from epicode_edge.decoding.batch_loop import generate_batched

PROMPTS = ["Hello there", "What is 17 + 25?", "Café crème", "def add(a, b):", "Law, math and logic", "東京",
           "Emoji: 😀 🚀"]


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    """Q8_0 (the quant whose batched kernels differ most from one sequence's), the engine's own thread counts."""
    from epicode_edge.runtime import load

    with load(bundle_dir(tmp_path_factory), backend="llama.cpp", quant="Q8_0", n_ctx=256) as rt:
        yield rt


def _batched(rt, settings: dict, overlap: bool, parallel: int = 3, prompts=PROMPTS) -> tuple[dict, dict]:
    """(key -> Result, key -> [Explain or None per token])."""
    s = rt.settings(**settings)
    explained: dict = {}
    e, a = rt.multiseq(parallel)
    with e, a:
        res = dict(generate_batched(e, a, rt.expert, [(i, rt.encode(p), s) for i, p in enumerate(prompts)],
                                    overlap=overlap,
                                    on_event=lambda k, ev: explained.setdefault(k, []).append(ev.explain)))
    return res, explained


@pytest.mark.parametrize("settings", [
    dict(max_tokens=20, lam=1.0, alpha=0.05),
    dict(max_tokens=16, temp=0.8, seed=3, top_p=0.9),
    dict(max_tokens=16, lam=0.5, candidate_head=False),
    dict(max_tokens=16, repetition_penalty=1.3),
    dict(max_tokens=12, lam=1.0, explain=True, lazy=False),
])
def test_overlapped_batch_is_bit_identical_to_the_naive_batched_loop(runtime, settings):
    """Overlap feeds the amateur every token of every slot, as sync feeding with lazy=False: the same picks,
    and (explain) the same log-probs and scores bit for bit; more requests than slots."""
    naive, naive_x = _batched(runtime, dict(settings, lazy=False), overlap=False)
    over, over_x = _batched(runtime, settings, overlap=True)
    assert sorted(over) == sorted(naive) == list(range(len(PROMPTS)))
    for i in naive:
        assert not isinstance(over[i], BaseException), over[i]
        assert over[i].tokens == naive[i].tokens and over[i].text == naive[i].text
        assert over[i].finish_reason == naive[i].finish_reason
    assert sum(r.completion_tokens for r in over.values()) > 0
    if settings.get("lam", 0.5) > 0 and "temp" not in settings:
        assert sum(r.changed_tokens for r in over.values()) > 0  # the amateur's logits did matter
    if settings.get("explain"):
        assert all(x is not None for xs in over_x.values() for x in xs)
        assert over_x == naive_x  # both models' log-probs and the scores, float for float


def test_overlap_runs_the_amateur_in_a_worker_thread_one_core_each(runtime, monkeypatch):
    """stream_many (batch --parallel, serve's slots) decides overlap: with it the amateur's batches run in
    the worker thread and each model's batched context gets half the cores (1 on 2 cores: no thread of a
    decode spins at a barrier for a descheduled sibling); without it, the engine's thread counts as one request
    has them (a call of several slots with the generation count: tests/test_batch_steps.py)."""
    seen = {}
    real = batch_loop.generate_batched

    def spy(e, a, *args, overlap=False, **kw):
        decode = a.decode

        def traced(*x, **k):
            seen.setdefault("amateur_threads", set()).add(threading.current_thread().name)
            return decode(*x, **k)

        a.decode = traced
        seen.update(overlap=overlap, threads=(e.threads, a.threads))
        yield from real(e, a, *args, overlap=overlap, **kw)

    monkeypatch.setattr(batch_loop, "generate_batched", spy)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    s = runtime.settings(max_tokens=6, lam=1.0)
    want = [runtime.generate(p, max_tokens=6, lam=1.0).tokens for p in PROMPTS[:4]]
    got = dict(runtime.stream_many([(i, runtime.encode(p), s) for i, p in enumerate(PROMPTS[:4])], parallel=4))
    assert [got[i].tokens for i in range(4)] == want
    assert seen["overlap"] is True and seen["threads"] == ((1, 1), (1, 1))
    assert seen["amateur_threads"] and all(n.startswith("epicode-amateur") for n in seen["amateur_threads"])

    seen.clear()
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    list(runtime.stream_many([(0, runtime.encode(PROMPTS[0]), s)], parallel=2))
    assert seen["overlap"] is True and seen["threads"] == ((4, 4), (4, 4))

    seen.clear()
    list(runtime.stream_many([(0, runtime.encode(PROMPTS[0]), s)], parallel=2, overlap=False))
    load = runtime.expert._threads_at_load  # the engine's (generation, prompt) threads, as one request has them
    assert seen["overlap"] is False and seen["threads"] == (load, load)
    assert seen["amateur_threads"] == {threading.current_thread().name}


def test_auto_batch_overlap_on_one_and_two_cores(runtime, tmp_path_factory, monkeypatch):
    from epicode_edge.runtime import load

    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert runtime.batch_overlaps() is False  # one core: nothing to overlap
    assert runtime.batch_overlaps(True) is True  # asked for: as the single-request overlap
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert runtime.batch_overlaps() is True
    assert runtime.batch_overlaps(False) is False
    assert runtime.batch_overlaps(finetuned=True) is False  # one model
    default = runtime.defaults
    try:
        runtime.defaults = default.updated(overlap=False)  # serve --no-overlap sets the defaults
        assert runtime.batch_overlaps() is False
    finally:
        runtime.defaults = default
    with load(bundle_dir(tmp_path_factory), backend="llama.cpp", quant="Q8_0", n_ctx=64, n_threads=2) as rt2:
        assert rt2.batch_overlaps() is False  # 2 + 2 given threads would oversubscribe 2 cores
        monkeypatch.setattr(os, "cpu_count", lambda: 4)
        assert rt2.batch_overlaps() is True


def test_serve_slots_decode_overlapped_over_a_socket(runtime, monkeypatch):
    """serve --parallel N decodes its slots through stream_many: the contrastive model's slots overlap with one
    thread per model on 2 cores; the finetuned model's slots (one model) do not, and decode with the engine's
    thread counts."""
    import httpx
    import uvicorn

    from epicode_edge.apps import serve

    seen = []
    real = batch_loop.generate_batched

    def spy(e, a, *args, overlap=False, **kw):
        seen.append((e is a, overlap, e.threads))
        yield from real(e, a, *args, overlap=overlap, **kw)

    monkeypatch.setattr(batch_loop, "generate_batched", spy)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    app = serve.create_app(runtime, serve.ServeConfig(name="tiny", parallel=3, max_queue=4))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(600):
            if server.started or not thread.is_alive():
                break
            threading.Event().wait(0.05)
        assert server.started, "server did not start"
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        for model in ("tiny", "tiny:finetuned"):
            r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": PROMPTS[1], "max_tokens": 4},
                           timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] > 0
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert (False, True, (1, 1)) in seen  # the contrastive slots
    assert (True, False, runtime.expert._threads_at_load) in seen  # the finetuned slots: as one request
