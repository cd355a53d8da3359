"""Batch runner: JSONL parsing, error records, output repair and resume (pure), then real-engine runs."""

from __future__ import annotations

import json

import pytest

from epicode_edge.apps import batch
from epicode_edge.errors import InputError


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# parsing (no engine)
# ---------------------------------------------------------------------------------------------


def test_parse_line_request_and_overrides():
    r = batch.parse_line(b'{"id": "a", "prompt": "hi", "lambda": 0.2, "max_tokens": 5, "stop": ["\\n"]}', 3)
    assert isinstance(r, batch.Request)
    assert (r.id, r.line, r.prompt, r.messages) == ("a", 3, "hi", None)
    assert r.settings == {"lam": 0.2, "max_tokens": 5, "stop": ["\n"]}
    m = batch.parse_line(b'{"id": 7, "messages": [{"role": "user", "content": "x"}]}', 1)
    assert m.messages == [{"role": "user", "content": "x"}] and m.id == 7
    assert batch.parse_line(b"   \r", 9) is None


@pytest.mark.parametrize("raw, id_, fragment", [
    (b'{"id": "a", "prompt": "x"', None, "not valid JSON"),
    (b"[1, 2]", None, "expected a JSON object"),
    (b'{"prompt": "x"}', None, "missing field 'id'"),
    (b'{"id": true, "prompt": "x"}', None, "'id' must be"),
    (b'{"id": "a"}', "a", "exactly one of 'prompt' or 'messages'"),
    (b'{"id": "a", "prompt": "x", "messages": []}', "a", "exactly one"),
    (b'{"id": "a", "prompt": 3}', "a", "'prompt' must be a string"),
    (b'{"id": "a", "messages": [{"role": "bot", "content": "x"}]}', "a", "messages[0]"),
    (b'{"id": "a", "prompt": "x", "temperature": 0.5}', "a", "unknown field 'temperature'"),
    (b'{"id": "a", "prompt": "x", "max_tokens": "5"}', "a", "'max_tokens' must be an integer"),
    (b'{"id": "a", "prompt": "x", "seed": 1.5}', "a", "'seed' must be an integer"),
    (b'{"id": "a", "prompt": "x", "stop": [1]}', "a", "list of strings"),
    (b'{"id": "a", "prompt": "\xff"}', None, "not UTF-8"),
])
def test_parse_line_errors_are_records(raw, id_, fragment):
    rec = batch.parse_line(raw, 4)
    assert rec["id"] == id_ and rec["line"] == 4
    assert fragment in rec["error"] and rec["error"].startswith("line 4:")
    assert "\n" not in rec["error"]


def test_duplicates_reported_first_kept():
    data = b'{"id": "a", "prompt": "1"}\n{"id": "b", "prompt": "2"}\n{"id": "a", "prompt": "3"}\n'
    items, dups = batch.parse_input(data)
    assert [it.prompt for it in items] == ["1", "2"]
    assert dups == [("a", 3, 1)]


def test_request_input_system_and_defaults():
    r = batch.parse_line(b'{"id": 1, "prompt": "q", "system": "be brief", "temp": 0.7}', 1)
    msgs, settings = batch.request_input(r, {"temp": 0.0, "max_tokens": 9, "seed": None})
    assert msgs == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}]
    assert settings == {"temp": 0.7, "max_tokens": 9}
    r = batch.parse_line(b'{"id": 1, "messages": [{"role": "system", "content": "old"},'
                         b' {"role": "user", "content": "q"}]}', 1)
    msgs, _ = batch.request_input(r, {"system": "new"})
    assert msgs[0] == {"role": "system", "content": "new"} and len(msgs) == 2


# ---------------------------------------------------------------------------------------------
# output checks, repair, resume (no engine)
# ---------------------------------------------------------------------------------------------


def _write_input(path, n=4, extra=b""):
    path.write_bytes(b"".join(b'{"id": "q%d", "prompt": "p%d"}\n' % (i, i) for i in range(n)) + extra)
    return path


def test_unreadable_input_and_unwritable_output(tmp_path):
    inp = _write_input(tmp_path / "in.jsonl")
    with pytest.raises(InputError, match="no such file"):
        batch.prepare(tmp_path / "missing.jsonl", tmp_path / "out.jsonl")
    with pytest.raises(InputError, match="is a directory"):
        batch.prepare(tmp_path, tmp_path / "out.jsonl")
    with pytest.raises(InputError, match="no such directory"):
        batch.prepare(inp, tmp_path / "nope" / "out.jsonl")
    with pytest.raises(InputError, match="is a directory"):
        batch.prepare(inp, tmp_path)
    with pytest.raises(InputError, match="not a directory"):
        batch.prepare(inp, inp / "out.jsonl")
    with pytest.raises(InputError, match="is the input file"):
        batch.prepare(inp, inp)
    assert not (tmp_path / "out.jsonl").exists()


def test_truncated_tail_is_cut_and_complete_records_kept(tmp_path):
    inp = _write_input(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    good = '{"id": "q0", "line": 1, "text": "x", "finish_reason": "stop"}\n'
    out.write_text(good + '{"id": "q1", "line": 2, "te')
    job = batch.prepare(inp, out)
    assert out.read_text() == good
    assert job.repaired and "truncated" in job.repaired
    assert [r.id for r in job.pending] == ["q1", "q2", "q3"] and job.skipped == 1


def test_last_record_without_newline_is_kept(tmp_path):
    inp = _write_input(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "q0", "line": 1, "text": "x"}')
    job = batch.prepare(inp, out)
    assert out.read_text() == '{"id": "q0", "line": 1, "text": "x"}\n'
    assert [r.id for r in job.pending] == ["q1", "q2", "q3"]


def test_foreign_output_is_refused(tmp_path):
    inp = _write_input(tmp_path / "in.jsonl")
    out = tmp_path / "notes.txt"
    out.write_text("my notes\nmore notes\n")
    with pytest.raises(InputError, match="line 1 is not a result record"):
        batch.prepare(inp, out)
    assert out.read_text() == "my notes\nmore notes\n"


def test_error_records_done_unless_retry(tmp_path):
    inp = _write_input(tmp_path / "in.jsonl", n=2, extra=b"garbage\n")
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "q0", "line": 1, "error": "boom"}\n{"id": null, "line": 3, "error": "bad"}\n'
                   '{"id": "q1", "line": 2, "text": "ok"}\n')
    job = batch.prepare(inp, out)
    assert job.pending == [] and job.skipped == 3
    job = batch.prepare(inp, out, retry_errors=True)
    assert [batch._item_key(it) for it in job.pending] == ['id:"q0"', "line:3"]
    assert _lines(out) == [{"id": "q1", "line": 2, "text": "ok"}]


def test_run_job_writes_error_records_without_runtime(tmp_path):
    """Bad lines never reach the runtime: a run of only bad lines needs none and loses nothing."""
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'{"id": 1}\nnot json\n\n{"id": 2, "prompt": "x", "top_k": "3"}\n')
    out = tmp_path / "out.jsonl"
    calls = []
    s = batch.run_batch(None, inp, out, progress=lambda d, t, r: calls.append((d, t)))
    recs = _lines(out)
    assert [(r["id"], r["line"]) for r in recs] == [(1, 1), (None, 2), (2, 4)]
    assert all("error" in r for r in recs)
    assert (s.n_ok, s.n_errors) == (0, 3)
    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3)]
    s = batch.run_batch(None, inp, out)  # rerun: all done
    assert (s.n_ok, s.n_errors, s.n_skipped) == (0, 0, 3) and len(_lines(out)) == 3
