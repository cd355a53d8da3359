"""Structured output in `serve`, driven by the real `openai` client: response_format json_object and json_schema
(strict), the extra grammar / regex fields, streamed and not, batched with other requests; bad ones are 400."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import openai
import pytest

from rt_models import N_THREADS, bundle_dir
from test_serve import _Running

KEY = "k-constraint"
MESSAGES = [{"role": "user", "content": "Give me a record."}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "ok"], "additionalProperties": False}
RF = {"type": "json_schema", "json_schema": {"name": "record", "strict": True, "schema": SCHEMA}}


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    from epicode_edge.runtime import load

    r = load(bundle_dir(tmp_path_factory), quant="F32", n_ctx=512, n_threads=N_THREADS)
    yield r
    r.close()


@pytest.fixture(scope="module")
def client(rt):
    s = _Running(rt, parallel=2, max_queue=8, api_key=KEY)
    yield openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    s.stop()


def test_json_schema_strict_equals_the_python_api(rt, client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=80, response_format=RF)
    text = r.choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)
    assert r.choices[0].finish_reason == "stop"
    assert text == rt.generate(MESSAGES, max_tokens=80, constraint=RF).text
    parts = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=80, response_format=RF,
                                           stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in parts if c.choices) == text


def test_json_object_grammar_and_regex_fields(client):
    r = client.completions.create(model="tiny", prompt="hi", max_tokens=120,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].text), dict)
    r = client.completions.create(model="tiny", prompt="x", max_tokens=20,
                                  extra_body={"regex": "[0-9]{2}-(yes|no)"})
    assert re.fullmatch("[0-9]{2}-(yes|no)", r.choices[0].text)
    r = client.chat.completions.create(model="tiny:finetuned", messages=MESSAGES, max_tokens=20,
                                       extra_body={"grammar": 'root ::= ("up" | "down") "!"'})
    assert r.choices[0].message.content in ("up!", "down!")


def test_concurrent_constrained_and_free_requests(client):
    out, errors = {}, []

    def one(i):
        try:
            kw = {"response_format": RF} if i % 2 == 0 else {}
            r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=80 if i % 2 == 0 else 6,
                                               **kw)
            out[i] = r.choices[0].message.content
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(out) == 4
    for i in (0, 2):
        jsonschema.validate(json.loads(out[i]), SCHEMA)


def test_max_tokens_before_the_end_says_so(client):
    r = client.chat.completions.with_raw_response.create(model="tiny", messages=MESSAGES, max_tokens=3,
                                                         response_format=RF)
    body = json.loads(r.text)
    assert body["choices"][0]["finish_reason"] == "length" and body["epicode"]["constraint_complete"] is False


@pytest.mark.parametrize("kw, param, fragment", [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "array", "uniqueItems": True}}}},
     "response_format", "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
     "must be an object with a 'schema'"),
    ({"response_format": {"type": "yaml"}}, "response_format", "response_format.type"),
    ({"extra_body": {"regex": "(("}}, "regex", "invalid regex"),
    ({"extra_body": {"grammar": "root ::= nothing"}}, "grammar", "nothing"),
    ({"extra_body": {"regex": 5}}, "regex", "'regex' must be a non-empty string"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"regex": "a"}}, "response_format",
     "give one of"),
])
def test_bad_constraints_are_400_naming_the_field(client, kw, param, fragment):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, **kw)
    assert fragment in e.value.message and "\n" not in e.value.message
    assert e.value.param == param or param in e.value.message
