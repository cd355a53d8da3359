"""`serve` is strict where clients need it, checked with the real `openai` client on 127.0.0.1: unknown model ids
are 404 model_not_found naming the ids served, fields the server does not implement are 400 naming the field
(never a silent 200), unknown paths and wrong methods get OpenAI's JSON error shape, and every request leaves
one log line (id, model, tokens, time, status)."""

from __future__ import annotations

import logging
import threading
import time

import openai
import pytest

from epicode_edge.apps import serve
from rt_models import f32_runtime

MESSAGES = [{"role": "user", "content": "What is 17 + 25?"}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    rt = f32_runtime(tmp_path_factory)
    served = serve.make_server(rt, serve.ServeConfig(name="tiny", parallel=2), port=0, log_level="error")
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    t0 = time.time()
    while not served.server.started:
        assert time.time() - t0 < 30 and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield served
    served.server.should_exit = True
    thread.join(timeout=30)
    rt.close()


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_an_unknown_model_id_is_404_naming_the_ids_served(client):
    for typo in ("tiny:finetune", "gpt-4o", "TINY"):
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model=typo, messages=MESSAGES, max_tokens=2)
        assert e.value.code == "model_not_found" and e.value.param == "model"
        assert repr(typo) in e.value.message and "'tiny'" in e.value.message and "'tiny:finetuned'" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny:fine", prompt="The quick", max_tokens=2)
    for model in ("tiny", "tiny:finetuned"):
        r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
        assert r.model == model and r.usage.completion_tokens == 2


@pytest.mark.parametrize("kw, field", [
    ({"logprobs": 1}, "logprobs"),
    ({"logprobs": False, "top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"extra_body": {"epicode": {"explain": 1}}}, "epicode"),
    ({"extra_body": {"epicode": {"why": True}}}, "epicode"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format"),  # json_object / json_schema: test_constraint_serve
    ({"n": 2}, "n"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logit_bias": {"42": 10}}, "logit_bias"),
    ({"extra_body": {"lamda": 1.0}}, "lamda"),
    ({"stream_options": {"include_usage": True, "chunk_size": 3}, "stream": True}, "stream_options"),
])
def test_an_unsupported_field_is_400_naming_it(client, kw, field):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, **kw)
    assert e.value.param == field and field in e.value.message and "\n" not in e.value.message


def test_completions_refuse_logprobs_and_suffix(client):
    for kw, field in (({"logprobs": 2}, "logprobs"), ({"suffix": "end"}, "suffix"), ({"best_of": 3}, "best_of")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="The quick", max_tokens=2, **kw)
        assert e.value.param == field


def test_fields_at_their_neutral_value_are_accepted(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, n=1, presence_penalty=0,
                                       frequency_penalty=0.0, logprobs=False, response_format={"type": "text"},
                                       user="someone", extra_body={"lambda": 0.5, "alpha": 0.1})
    assert r.usage.completion_tokens == 2


def test_unknown_paths_and_wrong_methods_get_json_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.get("/embeddings", cast_to=object)
    assert e.value.code == "not_found" and "/v1/embeddings" in e.value.message
    assert "POST /v1/chat/completions" in e.value.message
    with pytest.raises(openai.APIStatusError) as e:
        client.get("/chat/completions", cast_to=object)
    assert e.value.status_code == 405 and e.value.code == "method_not_allowed"
    assert e.value.response.headers["allow"] == "POST" and "use POST" in e.value.message
    with pytest.raises(openai.APIStatusError) as e:
        client.post("/models", cast_to=object, body={})
    assert e.value.status_code == 405 and e.value.response.json()["error"]["type"] == "invalid_request_error"


def test_one_log_line_per_request(client, caplog):
    caplog.set_level(logging.INFO, logger="epicode_edge.apps.serve")
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3)
    stream = client.chat.completions.create(model="tiny:finetuned", messages=MESSAGES, max_tokens=4, stream=True)
    chunks = list(stream)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=2)
    t0 = time.time()
    while len(caplog.records) < 3:  # the stream's line is written as its response ends
        assert time.time() - t0 < 10, [x.getMessage() for x in caplog.records]
        time.sleep(0.02)
    lines = [x.getMessage() for x in caplog.records if x.name == "epicode_edge.apps.serve"]
    assert len(lines) == 3, lines
    first, second, third = lines
    assert first.startswith(f"request {r.id} | POST /v1/chat/completions | status 200 | model 'tiny' | tokens "
                            f"{r.usage.prompt_tokens}+3 | ") and first.endswith(" s")
    assert second.startswith(f"request {chunks[0].id} | POST /v1/chat/completions | status 200 | "
                             "model 'tiny:finetuned' | tokens ") and "+4 |" in second
    assert "status 404 | model 'nope'" in third and "does not exist here" in third
