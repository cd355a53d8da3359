"""`serve` with explanations: the `epicode.explain` extra field, OpenAI's logprobs/top_logprobs, the chat page at
/, and the bytes of a request that asks for neither (unchanged). Tiny F32 bundle, real llama.cpp engine."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from rt_models import f32_runtime
from test_serve import _Running

MAX = 10
MESSAGES = [{"role": "user", "content": "What is 17 + 25?"}]
LAM, ALPHA = 2.0, 0.2


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    r = f32_runtime(tmp_path_factory)
    yield r
    r.close()


@pytest.fixture(scope="module")
def srv(rt):
    s = _Running(rt, parallel=2, max_queue=4)
    yield s
    s.stop()


def _sse(srv, body) -> list[dict]:
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        raw = r.read().decode()
    events = [e[len("data: "):] for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _want(rt, finetuned=False, **kw):
    """The runtime's own events for the same request (explain on, the server's default settings)."""
    ids = rt.encode(MESSAGES)
    s = rt.settings(max_tokens=MAX, explain=True, **kw)
    evs = list(rt.compare_ids(ids, s) if finetuned else rt.stream_ids(ids, s))
    return [e for e in evs if not e.final], evs[-1]


def test_explain_streams_each_tokens_data(rt, srv):
    chunks = _sse(srv, {"model": "tiny", "messages": MESSAGES, "max_tokens": MAX, "stream": True, "lambda": LAM,
                        "alpha": ALPHA, "epicode": {"explain": True}})
    toks = [t for c in chunks for t in c.get("epicode", {}).get("tokens", [])]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    want, final = _want(rt, lam=LAM, alpha=ALPHA)
    assert [t["token"] for t in toks] == [e.token for e in want]
    assert "".join(t["text"] for t in toks) + final.text == text
    for t, e in zip(toks, want):
        assert [c["id"] for c in t["candidates"]] == sorted(
            e.explain.candidates, key=lambda i: -e.explain.scores[e.explain.candidates.index(i)]
            if e.explain.scores else -e.explain.expert_logprobs[e.explain.candidates.index(i)])
        assert t["changed"] == e.changed and t["skipped"] == e.skipped
        assert t["logprob"] == pytest.approx(e.explain.logprob, abs=1e-4)
    assert any(t["changed"] for t in toks)
    last = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    st = last["epicode"]["stats"]
    assert st["completion_tokens"] == len(toks) and st["changed"] == sum(t["changed"] for t in toks)
    assert st["amateur_skipped"] == sum(t["skipped"] for t in toks) and st["tokens_per_s"] > 0


def test_logprobs_are_the_speaking_models(rt, srv):
    import openai

    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    for model, finetuned in (("tiny", False), ("tiny:finetuned", True)):
        r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX, logprobs=True,
                                           top_logprobs=3)
        want, _ = _want(rt, finetuned=finetuned, top_logprobs=3)
        content = r.choices[0].logprobs.content
        assert [c.logprob for c in content] == pytest.approx([e.explain.logprob for e in want], abs=1e-4)
        assert b"".join(bytes(c.bytes) for c in content).decode("utf-8", "replace") == r.choices[0].message.content
        for c, e in zip(content, want):
            assert len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.top_logprobs[-1].logprob
            np.testing.assert_allclose([t.logprob for t in c.top_logprobs],
                                       [lp for _, lp in e.explain.top_logprobs], atol=1e-4)
        assert "tokens" not in r.model_extra["epicode"]  # logprobs alone: no explain data
        chunks = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX, logprobs=True,
                                                stream=True)
        streamed = [lp for ch in chunks if ch.choices and ch.choices[0].logprobs
                    for lp in ch.choices[0].logprobs.content]
        assert [c.token for c in streamed] == [c.token for c in content]
        assert [c.top_logprobs for c in streamed] == [[]] * len(streamed)


def test_a_request_without_explain_streams_the_bytes_it_did_before(rt, srv):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": MAX, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=120) as r:
        raw = r.read().decode()
    first = json.loads(raw.split("\n\n")[0][len("data: "):])
    meta = {k: first[k] for k in ("id", "created", "model")}

    def chunk(choice):
        return "data: " + json.dumps({**meta, "object": "chat.completion.chunk", "choices": [choice]},
                                     ensure_ascii=False) + "\n\n"

    events = list(rt.stream_ids(rt.encode(MESSAGES), rt.settings(max_tokens=MAX)))
    want = chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
    for ev in events:
        if ev.text:
            want += chunk({"index": 0, "delta": {"content": ev.text}, "finish_reason": None})
    want += chunk({"index": 0, "delta": {}, "finish_reason": events[-1].finish_reason}) + "data: [DONE]\n\n"
    assert raw == want


def test_finetuned_explained_changes_nothing(srv):
    chunks = _sse(srv, {"model": "tiny:finetuned", "messages": MESSAGES, "max_tokens": 6, "stream": True,
                        "epicode": {"explain": True}})
    toks = [t for c in chunks for t in c.get("epicode", {}).get("tokens", [])]
    assert len(toks) == 6 and not any(t["changed"] for t in toks)
    assert all(t["candidates"][0]["amateur_logprob"] is None for t in toks)


def test_the_chat_page_is_served_at_root_and_needs_nothing_else(srv):
    r = httpx.get(srv.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    html = r.text
    assert "<link rel=\"stylesheet\"" not in html and "<script src" not in html and "EpicodeTokens" in html
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    assert "/v1/chat/completions" in html and "sessionStorage" in html and "prefers-color-scheme" in html


def test_explain_without_streaming_and_on_completions(rt, srv):
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
        "model": "tiny", "messages": MESSAGES, "max_tokens": MAX, "lambda": LAM, "alpha": ALPHA,
        "epicode": {"explain": True}}).json()
    ep = r["epicode"]
    want, final = _want(rt, lam=LAM, alpha=ALPHA)
    assert [t["token"] for t in ep["tokens"]] == [e.token for e in want]
    assert "".join(t["text"] for t in ep["tokens"]) + final.text == r["choices"][0]["message"]["content"]
    assert ep["stats"]["changed"] == ep["changed_tokens"] == sum(t["changed"] for t in ep["tokens"])
    assert "logprobs" not in r["choices"][0]  # explain alone: no OpenAI logprobs
    with httpx.stream("POST", srv.url + "/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": "The quick", "max_tokens": 6, "stream": True,
            "epicode": {"explain": True}}) as s:
        chunks = [json.loads(e[6:]) for e in s.read().decode().split("\n\n") if e and e != "data: [DONE]"]
    toks = [t for c in chunks for t in c.get("epicode", {}).get("tokens", [])]
    assert len(toks) == 6 and "".join(t["text"] for t in toks) == "".join(c["choices"][0]["text"] for c in chunks)
    bad = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "logprobs": True})
    assert bad.status_code == 400 and "chat/completions" in bad.json()["error"]["message"]
