"""Structured output from the command line (generate, batch) and bad constraints as one-line errors."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from epicode_edge.decoding import constraint as C
from epicode_edge.errors import ConstraintError, InputError

from cli_helpers import assert_one_line_error, cli
from rt_models import N_THREADS, bundle, bundle_dir, rt  # noqa: F401 (fixtures)

ENGINE = ["--threads", N_THREADS, "--quant", "F32"]
SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "why": {"type": "string", "maxLength": 6}},
          "required": ["answer", "why"], "additionalProperties": False}


@pytest.fixture
def schema_file(tmp_path):
    p = tmp_path / "schema.json"
    p.write_text(json.dumps(SCHEMA))
    return p


def test_generate_json_schema_regex_grammar_and_json_object(bundle, rt, schema_file, tmp_path):
    code, out = cli("generate", bundle, "What is 17 + 25?", "--json-schema", schema_file, "--json", *ENGINE)
    assert code == 0, out
    res = json.loads(out)
    jsonschema.validate(json.loads(res["text"]), SCHEMA)
    assert res["finish_reason"] == "stop" and res["timings"]["constraint_complete"] is True
    # the same answer as the Python API's constraint= setting
    api = rt.generate("What is 17 + 25?", constraint=C.json_schema(SCHEMA))
    assert res["tokens"] == api.tokens
    code, out = cli("generate", bundle, "x", "--raw", "--regex", "[0-9]{3}-(yes|no)", "--json", *ENGINE)
    assert code == 0 and re.fullmatch("[0-9]{3}-(yes|no)", json.loads(out)["text"]), out
    g = tmp_path / "yn.gbnf"
    g.write_text('root ::= ("yes" | "no") "!"\n')
    code, out = cli("generate", bundle, "x", "--raw", "--grammar", g, "--json", *ENGINE)
    assert code == 0 and json.loads(out)["text"] in ("yes!", "no!"), out
    code, out = cli("generate", bundle, "hi", "--raw", "--json-object", "--json", "--max-tokens", 160, *ENGINE)
    assert code == 0 and json.loads(out)["finish_reason"] == "stop", out
    assert isinstance(json.loads(json.loads(out)["text"]), dict), out


def test_generate_says_when_max_tokens_cuts_the_constraint(bundle, tmp_path):
    p = tmp_path / "long.json"
    p.write_text(json.dumps({"type": "object", "properties": {"t": {"type": "string", "minLength": 40}},
                             "required": ["t"]}))
    code, out = cli("generate", bundle, "x", "--raw", "--json-schema", p, "--max-tokens", 6, *ENGINE)
    assert code == 0, out
    assert "finish: length" in out and "stopped before the end of the constraint" in out


def test_batch_default_constraint_and_per_line_response_format(bundle, schema_file, tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [
        {"id": "a", "prompt": "one"},  # the command's --json-schema
        {"id": "b", "prompt": "two", "response_format": {"type": "regex", "regex": "(red|blue)-[0-9]"}},
        {"id": "c", "prompt": "three", "response_format": {"type": "json_object"}},
        {"id": "d", "prompt": "four", "response_format": {"type": "text"}, "max_tokens": 4},  # none
        {"id": "e", "prompt": "five", "response_format": {"type": "regex", "regex": "a(b"}},
        {"id": "f", "prompt": "six", "response_format": {"type": "json_schema", "json_schema": {
            "schema": {"type": "array", "uniqueItems": True}}}},
    ]
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out.jsonl"
    for parallel in (1, 2):
        if out.exists():
            out.unlink()
        code, log = cli("batch", bundle, src, "-o", out, "--json-schema", schema_file, "--parallel", parallel,
                        *ENGINE)
        assert code == 0, log
        recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
        jsonschema.validate(json.loads(recs["a"]["text"]), SCHEMA)
        assert re.fullmatch("(red|blue)-[0-9]", recs["b"]["text"])
        assert isinstance(json.loads(recs["c"]["text"]), dict)
        assert recs["a"]["constraint_complete"] is True and "constraint_complete" not in recs["d"]
        assert recs["d"]["completion_tokens"] == 4
        assert "line 5: response_format.regex: invalid regex" in recs["e"]["error"]
        assert "uniqueItems" in recs["f"]["error"] and "line 6: response_format.json_schema.schema" in recs["f"]["error"]


# ---------------------------------------------------------------------------------------------
# bad constraints: one line naming what is wrong, before the models load
# ---------------------------------------------------------------------------------------------


def test_bad_constraints_on_the_command_line(bundle, tmp_path):
    bad_schema = tmp_path / "bad.json"
    bad_schema.write_text('{"type": "object", "properties": {"a": {"type": "string"}}, "uniqueItems": true, '
                          '"dependentSchemas": {}}')
    code, out = cli("generate", bundle, "x", "--json-schema", bad_schema, *ENGINE)
    assert_one_line_error(code, out, str(bad_schema), "unsupported JSON schema", "dependentSchemas")
    not_json = tmp_path / "nj.json"
    not_json.write_text("{type: object}")
    code, out = cli("generate", bundle, "x", "--json-schema", not_json, *ENGINE)
    assert_one_line_error(code, out, str(not_json), "not valid JSON")
    code, out = cli("generate", bundle, "x", "--json-schema", tmp_path / "missing.json", *ENGINE)
    assert_one_line_error(code, out, "missing.json", "cannot read the JSON schema")
    code, out = cli("generate", bundle, "x", "--regex", "[0-9", *ENGINE)
    assert_one_line_error(code, out, "--regex", "invalid regex")
    g = tmp_path / "g.gbnf"
    g.write_text("root ::= answer\n")
    code, out = cli("batch", bundle, tmp_path / "in.jsonl", "-o", tmp_path / "o.jsonl", "--grammar", g, *ENGINE)
    assert_one_line_error(code, out, str(g), "answer")
    code, out = cli("generate", bundle, "x", "--regex", "a", "--json-object", *ENGINE)
    assert_one_line_error(code, out, "give one constraint", "--regex", "--json-object")


@pytest.mark.parametrize("value, fragment", [
    ({"type": "xml"}, "response_format.type: must be one of"),
    ({"type": "json_schema"}, "response_format.json_schema: must be an object with a 'schema'"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "objekt"}}}, "Invalid type: objekt"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}, "strict: must be true or false"),
    ({"type": "json_schema", "json_schema": {"schema": [1]}}, "must be an object (or true/false)"),
    ({"type": "regex", "regex": ""}, "response_format.regex: a regex must be a non-empty string"),
    ({"type": "grammar", "grammar": "start: foo"}, "response_format.grammar: invalid grammar"),
    ("json", "must be an object with a 'type'"),
])
def test_bad_response_formats_are_one_line_constraint_errors(value, fragment):
    with pytest.raises(ConstraintError) as e:
        C.parse_constraint(value)
    msg = str(e.value)
    assert fragment in msg and "\n" not in " ".join(msg.split()), msg
    assert isinstance(e.value, InputError)


def test_python_api_setting_checks_the_constraint(rt):
    from epicode_edge.errors import ParameterError

    with pytest.raises(ConstraintError, match="constraint.regex: invalid regex"):
        rt.settings(constraint={"type": "regex", "regex": "(("})
    with pytest.raises(ParameterError, match="fast_forward must be True or False"):
        rt.settings(fast_forward="yes")
    assert rt.settings(constraint={"type": "text"}).constraint is None


def test_eval_scores_constrained_answers_with_json_extract(bundle, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": i, "prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(3)))
    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0,
                                                                              "maximum": 9}},
                                  "required": ["answer"], "additionalProperties": False}))
    out = tmp_path / "ev"
    code, log = cli("eval", bundle, data, "-o", out, "--json-schema", schema, "--extract", "json:answer",
                    "--methods", "finetuned,epicode", "--max-tokens", 40, *ENGINE)
    assert code == 0, log
    recs = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    for rec in recs:
        for m in ("finetuned", "epicode"):
            got = json.loads(rec[m]["text"])["answer"]  # every row's answer is constrained
            assert rec[m]["extracted"] == str(got)
            assert rec[m]["correct"] == (got == int(rec["answer"]))
    assert json.loads((out / "summary.json").read_text())["settings"]["constraint"]["type"] == "json_schema"


def test_json_extractor():
    from epicode_edge.apps import tasks

    ex = tasks.make_extractor("json:result.values.1")
    assert ex('{"result": {"values": [1, 2.5]}}') == "2.5"
    assert ex('{"result": {}}') is None and ex("not json") is None
    assert tasks.make_extractor("json:answer")('{"answer": " Paris "}') == "Paris"
    assert tasks.is_correct("42", "42.0", "json:answer") and not tasks.is_correct("Paris", "paris", "json:answer")
    with pytest.raises(Exception, match="json:"):
        tasks.make_extractor("json:")


def test_a_lines_response_format_survives_json_as_ray_sends_it(rt):
    from dataclasses import asdict

    from epicode_edge.apps import batch

    r = batch.parse_line(b'{"id": 1, "prompt": "x", "response_format": {"type": "regex", "regex": "[ab]{2}"}}', 1)
    back = batch.Request(**json.loads(json.dumps(asdict(r))))  # apps/ray_batch.py's way to its workers
    s = rt.settings(**back.settings)
    assert (s.constraint.kind, s.constraint.text) == ("regex", "[ab]{2}")
    assert re.fullmatch("[ab]{2}", rt.generate("x", raw=True, max_tokens=8, **back.settings).text)
