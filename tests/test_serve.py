"""`serve`: the OpenAI-compatible server on 127.0.0.1, driven by the real `openai` client and raw HTTP.

The server runs in a thread of this process (uvicorn on a free port) over the tiny F32 test bundle; every
request it gets here is bounded (few tokens, few clients) and the server stops at the end of the module.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from epicode_edge.apps import serve
from rt_models import f32_runtime

MAX = 12
KEY = "test-key-123"


class _Running:
    def __init__(self, rt, **cfg):
        import uvicorn

        self.app = serve.create_app(rt, serve.ServeConfig(name="tiny", **cfg))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="error",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert time.time() - t0 < 30 and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    r = f32_runtime(tmp_path_factory)
    yield r
    r.close()


@pytest.fixture(scope="module")
def srv(rt):
    s = _Running(rt, parallel=3, max_queue=8, api_key=KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(srv):
    import openai

    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


MESSAGES = [{"role": "user", "content": "What is 17 + 25?"}]


def test_models_and_health(srv, client):
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny:finetuned"]
    h = httpx.get(srv.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny"


def test_chat_greedy_equals_generate(rt, client):
    want = rt.generate("What is 17 + 25?", max_tokens=MAX)
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX, temperature=0)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
    assert r.model_extra["epicode"]["changed_tokens"] == want.changed_tokens


def test_chat_stream_equals_generate(rt, client):
    want = rt.generate("What is 17 + 25?", max_tokens=MAX, lam=1.0, alpha=0.05)
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"lambda": 1.0, "alpha": 0.05})
    text, finish, usage = [], None, None
    for ch in stream:
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            text.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(text) == want.text and finish == want.finish_reason
    assert usage.completion_tokens == want.completion_tokens


def test_completion_raw_prompt_stream_and_not(rt, client):
    want = rt.generate("The quick brown fox", raw=True, max_tokens=MAX)
    r = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=MAX)
    assert r.choices[0].text == want.text
    parts = [c.choices[0].text for c in client.completions.create(model="tiny", prompt="The quick brown fox",
                                                                  max_tokens=MAX, stream=True) if c.choices]
    assert "".join(parts) == want.text


def test_finetuned_model_alone(rt, client):
    want = rt.compare("What is 17 + 25?", max_tokens=MAX)
    r = client.chat.completions.create(model="tiny:finetuned", messages=MESSAGES, max_tokens=MAX)
    assert r.choices[0].message.content == want.text and r.model_extra["epicode"]["changed_tokens"] == 0


def test_eight_concurrent_clients_all_answered(rt, client):
    prompts = [f"Tell me about number {i}" for i in range(8)]
    want = {p: rt.generate(p, max_tokens=MAX).text for p in prompts}
    got, errors = {}, []

    def ask(p):
        try:
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}],
                                               max_tokens=MAX)
            got[p] = r.choices[0].message.content
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and got == want


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps({"messages": MESSAGES, "max_tokens": "many"}).encode(), 400, "'max_tokens' must be an integer"),
    (json.dumps({"messages": MESSAGES, "temperature": "hot"}).encode(), 400, "'temperature' must be a number"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "messages"),
    (json.dumps({"messages": MESSAGES, "n": 2}).encode(), 400, "'n' must be between 1 and 1"),
    (json.dumps({"messages": MESSAGES, "max_tokens": 10 ** 6}).encode(), 400, "more than this server's limit"),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 400}]}).encode(), 400, "never cuts a prompt"),
])
def test_bad_requests_get_a_status_and_one_line(srv, body, status, fragment):
    r = httpx.post(srv.url + "/v1/chat/completions", content=body,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    msg = r.json()["error"]["message"]
    assert fragment in msg and "\n" not in msg
    ok = httpx.post(srv.url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2},
                    headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert ok.status_code == 200  # the server keeps serving


def test_wrong_or_missing_key_is_401(srv):
    for headers in ({}, {"Authorization": "Bearer nope"}):
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": MESSAGES}, headers=headers)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.get(srv.url + "/v1/models").status_code == 401


def test_disconnect_frees_the_slot_and_full_queue_is_429(rt, monkeypatch):
    """One slot, no queue. The decoding thread is held after the first token (a pause added around the real
    scheduler's event hook: the tiny model would otherwise finish 200 tokens in milliseconds): while the slot is
    busy, another request gets 429 + Retry-After; the client goes away; the slot is freed at the next step
    (cancelled, not run to 200 tokens), and the next request is served."""
    gate, first = threading.Event(), threading.Event()
    on_event = serve.Scheduler._on_event

    def held(self, key, ev):
        on_event(self, key, ev)
        if key == 1:
            first.set()
            assert gate.wait(60)

    monkeypatch.setattr(serve.Scheduler, "_on_event", held)
    s = _Running(rt, parallel=1, max_queue=0)
    try:
        body = {"messages": MESSAGES, "max_tokens": 200, "stream": True}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            assert first.wait(60)  # request 1 decoded a token and holds the only slot
            busy = httpx.post(s.url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
            assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
            assert "busy" in busy.json()["error"]["message"]
        sched = s.app.state.server.scheduler(False)
        t0 = time.time()
        while not all(j.cancelled for j in list(sched._jobs.values())):  # the server saw the client go
            assert time.time() - t0 < 60
            time.sleep(0.02)
        gate.set()
        while httpx.get(s.url + "/health").json()["schedulers"]["epicode"]["in_flight"]:
            assert time.time() - t0 < 60
            time.sleep(0.02)
        h = httpx.get(s.url + "/health").json()["schedulers"]["epicode"]
        assert (h["cancelled"], h["completed"]) == (1, 0), h
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3}, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        gate.set()
        s.stop()


def test_parse_request_rules():
    p = serve.parse_request({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                             "stop": "x", "seed": 3, "top_k": 5, "lambda": 2.0, "model": "m:finetuned"},
                            "chat", max_tokens_limit=100, default_max_tokens=256)
    assert p["input"] == [{"role": "user", "content": "hi"}] and p["finetuned"] is True
    assert p["settings"] == {"max_tokens": 100, "stop": ["x"], "seed": 3, "top_k": 5, "lam": 2.0}
    with pytest.raises(serve.RequestError, match="only text parts"):
        serve.parse_request({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "chat",
                            max_tokens_limit=10, default_max_tokens=5)
    with pytest.raises(serve.RequestError, match="'prompt' must be a string"):
        serve.parse_request({"prompt": [1, 2, 3]}, "completion", max_tokens_limit=10, default_max_tokens=5)
