"""Batch runner: JSONL parsing, error records, output repair and resume (pure), then real-engine runs."""

from __future__ import annotations

import json

import pytest

from epicode_edge.apps import batch
from epicode_edge.errors import InputError, ParameterError


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
    with batch.prepare(inp, out) as job:  # a job holds the output's lock until closed
        assert job.pending == [] and job.skipped == 3
    with batch.prepare(inp, out, retry_errors=True) as job:
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


# ---------------------------------------------------------------------------------------------
# real engine (llama.cpp on a tiny F32 bundle)
# ---------------------------------------------------------------------------------------------

PROMPTS = ["Hello there", "What is 17 + 25?", "Café crème", "def add(a, b):", "Law, math and logic", "東京"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from factory import make_pair

    from epicode_edge.converters.convert import convert

    root = tmp_path_factory.mktemp("batch")
    ft, inf = make_pair(root, arch="llama", seed=5)
    return convert(ft, inf, root / "bundle", mu=0.5, to=("gguf", "mlx"), quant=("F32",)).path


@pytest.fixture(scope="module")
def runtime(bundle):
    from epicode_edge.runtime import load

    with load(bundle, backend="llama.cpp", n_ctx=256, n_threads=1) as rt:
        yield rt


def _requests(path, prompts=PROMPTS):
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": p}, ensure_ascii=False) + "\n"
                            for i, p in enumerate(prompts)))
    return path


def test_resume_after_interrupt_and_crash_gives_every_id_once(runtime, tmp_path):
    inp = _requests(tmp_path / "in.jsonl")
    ref = tmp_path / "ref.jsonl"
    batch.run_batch(runtime, inp, ref, max_tokens=6)
    want = {r["id"]: r for r in _lines(ref)}
    assert sorted(want) == [f"r{i}" for i in range(len(PROMPTS))]

    out = tmp_path / "out.jsonl"

    def stop_after(n):
        def progress(done, total, rec):
            if done == n:
                raise KeyboardInterrupt
        return progress

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C after 2 records: both are on disk
        batch.run_batch(runtime, inp, out, max_tokens=6, progress=stop_after(2))
    assert [r["id"] for r in _lines(out)] == ["r0", "r1"]
    with pytest.raises(KeyboardInterrupt):
        batch.run_batch(runtime, inp, out, max_tokens=6, progress=stop_after(3))
    with open(out, "a") as f:  # a crash in the middle of writing the next record
        f.write('{"id": "r3", "line": 4, "text": "half')
    s = batch.run_batch(runtime, inp, out, max_tokens=6)
    got = _lines(out)
    assert sorted(r["id"] for r in got) == sorted(want)  # every id exactly once
    assert (s.n_ok, s.n_errors, s.n_skipped) == (3, 0, 3)
    for r in got:  # greedy: the resumed run gives what an uninterrupted run gives
        assert {k: v for k, v in r.items() if k != "timings"} == {k: v for k, v in want[r["id"]].items()
                                                                  if k != "timings"}
    assert all(r["completion_tokens"] == 6 and r["finish_reason"] == "length" for r in got)
    assert set(got[0]["timings"]) == set(batch.TIMINGS)


def test_bad_lines_and_failed_requests_become_error_records(runtime, tmp_path):
    inp = tmp_path / "in.jsonl"
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 60  # more than n_ctx = 256 tokens
    inp.write_text("\n".join([
        json.dumps({"id": "ok1", "prompt": "Hello there", "max_tokens": 3}),
        "{not json",
        json.dumps({"id": "neg", "prompt": "x", "lambda": -1}),
        json.dumps({"id": "long", "prompt": long_prompt}),
        json.dumps({"id": "nomsg"}),
        json.dumps({"id": "ok2", "messages": [{"role": "system", "content": "Be terse."},
                                              {"role": "user", "content": "Hi"}], "max_tokens": 2, "seed": 1,
                    "temp": 0.8}),
        json.dumps({"id": "ok1", "prompt": "duplicate"}),
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    s = batch.run_batch(runtime, inp, out, max_tokens=4)
    recs = {(r["id"], r["line"]): r for r in _lines(out)}
    assert list(recs) == [("ok1", 1), (None, 2), ("neg", 3), ("long", 4), ("nomsg", 5), ("ok2", 6)]
    assert recs[("ok1", 1)]["completion_tokens"] == 3 and recs[("ok2", 6)]["completion_tokens"] == 2
    assert "not valid JSON" in recs[(None, 2)]["error"]
    assert "lambda must be" in recs[("neg", 3)]["error"]
    assert "context" in recs[("long", 4)]["error"]
    assert "exactly one of" in recs[("nomsg", 5)]["error"]
    assert (s.n_ok, s.n_errors, s.duplicates) == (2, 4, [("ok1", 7, 1)])


def test_compare_adds_the_finetuned_answer(runtime, tmp_path):
    inp = _requests(tmp_path / "in.jsonl", PROMPTS[:2])
    out = tmp_path / "out.jsonl"
    batch.run_batch(runtime, inp, out, compare=True, max_tokens=5)
    for r, p in zip(_lines(out), PROMPTS[:2]):
        assert r["finetuned_text"] == runtime.compare(p, max_tokens=5).text
        assert r["text"] == runtime.generate(p, max_tokens=5).text


def test_cli_batch_and_one_line_errors(bundle, tmp_path):
    from click.testing import CliRunner

    from epicode_edge.cli import main

    inp = _requests(tmp_path / "in.jsonl", PROMPTS[:3])
    out = tmp_path / "out.jsonl"
    run = CliRunner().invoke
    res = run(main, ["batch", str(bundle), str(inp), "-o", str(out), "--max-tokens", "4", "--threads", "1",
                     "--n-ctx", "256", "--backend", "llama.cpp"])
    assert res.exit_code == 0, res.output
    assert "3 ok, 0 errors" in res.stderr and "tok/s" in res.stderr
    assert [r["id"] for r in _lines(out)] == ["r0", "r1", "r2"]
    res = run(main, ["batch", str(bundle), str(inp), "-o", str(out)])
    assert res.exit_code == 0 and "Nothing to do" in res.stderr
    for args, msg in [([str(inp), "-o", str(tmp_path / "no" / "out.jsonl")], "no such directory"),
                      ([str(inp), "-o", str(tmp_path)], "is a directory"),
                      ([str(tmp_path / "missing.jsonl"), "-o", str(out)], "no such file")]:
        res = run(main, ["batch", str(bundle)] + args)
        assert res.exit_code == 1
        assert res.stderr.startswith("Error: ") and msg in res.stderr and res.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# batched decoding (several requests in one multi-sequence llama_decode per model per step)
# ---------------------------------------------------------------------------------------------


def _same(a, b):
    return (a.tokens, a.text, a.finish_reason, a.stopped_by, a.prompt_tokens, a.completion_tokens,
            a.changed_tokens) == (b.tokens, b.text, b.finish_reason, b.stopped_by, b.prompt_tokens,
                                  b.completion_tokens, b.changed_tokens)


def test_multisequence_logits_match_the_single_sequence_backend(runtime):
    import numpy as np

    e = runtime.expert
    prompts = [runtime.encode(p) for p in PROMPTS[:3]]
    want = []
    for p in prompts:
        e.truncate(0)
        want.append([e.prefill(p).copy(), e.step(7).copy(), e.step(11).copy()])
    with e.multiseq(n_slots=3) as ms:
        assert ms.n_ctx == e.n_ctx
        got = [ms.decode([(0, prompts[0]), (2, prompts[2])])]
        got.append(ms.decode([(0, [7]), (1, prompts[1]), (2, [7])]))  # a prompt joins while others step
        got.append(ms.decode([(0, [11]), (1, [7]), (2, [11])]))
        got.append(ms.decode([(1, [11])]))
        assert ms.tokens(0) == prompts[0] + [7, 11] and ms.n_past(1) == len(prompts[1]) + 2
        pairs = [(got[0][0], want[0][0]), (got[0][1], want[2][0]), (got[1][0], want[0][1]), (got[1][1], want[1][0]),
                 (got[1][2], want[2][1]), (got[2][0], want[0][2]), (got[2][1], want[1][1]), (got[2][2], want[2][2]),
                 (got[3][0], want[1][2])]
        for a, b in pairs:
            assert a.shape == (e.vocab_size,) and np.abs(a - b).max() < 1e-4
        # unequal entries in one call: each sequence's chunk is decoded whole, as a single-sequence context
        # does (llama.cpp would otherwise split it across ubatches, which rounds differently)
        for n in (2, 3, 4):
            ms.truncate(0, len(prompts[0]) - n)
            ms.truncate(1, len(prompts[1]) - 1)
            a = ms.decode([(0, prompts[0][-n:]), (1, prompts[1][-1:])])[0]
            e.truncate(0)
            e.prefill(prompts[0][:-n])
            assert np.array_equal(a, e.prefill(prompts[0][-n:]))
        ms.truncate(0, 3)
        assert ms.tokens(0) == prompts[0][:3]
        x = ms.decode([(0, prompts[0][3:])])[0]
        assert np.abs(x - want[0][0]).max() < 1e-4  # the cache really dropped the rest


@pytest.mark.parametrize("engine", ["llama.cpp", "mlx"])
def test_multisequence_rows_are_those_logits_or_none(bundle, engine):
    """decode(entries, rows=...): per entry the logits of those token ids (the whole vector's values), all of
    them (None), or none (empty: the entry is cached, no output); on MLX a step of several slots that all
    ask for rows runs their K rows of the output layer, not B x vocabulary."""
    import numpy as np

    from epicode_edge.runtime import load

    with load(bundle, backend=engine, n_ctx=256, n_threads=1) as rt:
        prompts = [rt.encode(p) for p in PROMPTS[:3]]
        ids = np.array([3, 200, 41])
        with rt.expert.multiseq(n_slots=3) as ms:
            whole = [ms.decode([(k, p)])[0] for k, p in enumerate(prompts)]
            whole_step = ms.decode([(0, [7]), (1, [7]), (2, [7])])
            for k in range(3):
                ms.truncate(k, 0)
            got = ms.decode([(k, p) for k, p in enumerate(prompts)], rows=[ids, None, ids[:0]])
            assert got[1].shape == (rt.expert.vocab_size,) and got[2].shape == (0,)
            np.testing.assert_allclose(got[0], whole[0][ids], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got[1], whole[1], rtol=1e-5, atol=1e-5)
            assert [ms.n_past(k) for k in range(3)] == [len(p) for p in prompts]
            seen = []
            if engine == "mlx":
                layer, head_rows = ms._head
                ms._head = (layer, lambda lyr, h, r: seen.append(r.shape) or head_rows(lyr, h, r))
            step = ms.decode([(0, [7]), (1, [7]), (2, [7])], rows=[ids, ids[::-1], ids[:0]])
            for k in range(2):
                np.testing.assert_allclose(step[k], whole_step[k][ids if k == 0 else ids[::-1]], rtol=1e-5, atol=1e-5)
            assert step[2].shape == (0,) and ms.n_past(2) == len(prompts[2]) + 1
            assert seen == ([(3,), (3,)] if engine == "mlx" else [])
            with pytest.raises(ParameterError, match="rows must be token ids"):
                ms.decode([(0, [8])], rows=[np.array([rt.expert.vocab_size])])
            with pytest.raises(ParameterError, match="1 rows for 2 entries"):
                ms.decode([(0, [8]), (1, [8])], rows=[None])


def test_batched_candidate_head_picks_as_the_whole_head(runtime):
    """The batched loop asks the amateur for the candidates' logits only (none for slots fed only to stay in
    sync): the same answers as with the whole vector."""
    from epicode_edge.apps.batch import generate_batch

    for settings in (dict(max_tokens=20, lam=1.0, alpha=0.2), dict(max_tokens=16, temp=0.8, seed=4)):
        whole = generate_batch(runtime, PROMPTS, parallel=3, candidate_head=False, **settings)
        rows = generate_batch(runtime, PROMPTS, parallel=3, **settings)
        assert all(_same(a, b) for a, b in zip(whole, rows))
        assert sum(r.changed_tokens for r in rows) > 0


@pytest.mark.parametrize("settings", [
    dict(max_tokens=24),
    dict(max_tokens=24, lam=1.0, alpha=0.05),
    dict(max_tokens=16, temp=0.8, seed=3, top_p=0.9),
    dict(max_tokens=30, stop=["e", "\n"]),
    dict(max_tokens=16, lazy=False),
    dict(max_tokens=16, repetition_penalty=1.3),
])
def test_batched_equals_one_after_another(runtime, settings):
    from epicode_edge.apps.batch import generate_batch

    prompts = PROMPTS + ["Emoji: 😀 🚀", "0123456789 3.14159", "Multiply 3 by 4"]  # more requests than slots
    seq = [runtime.generate(p, **settings) for p in prompts]
    bat = generate_batch(runtime, prompts, parallel=4, **settings)
    assert all(_same(a, b) for a, b in zip(seq, bat))
    assert sum(r.completion_tokens for r in bat) > 0


def test_lazy_and_sync_amateur_feeding_pick_the_same(runtime):
    """The batched loop feeds the amateur either only for the slots that need it (lazy) or, when any does,
    for all (sync, the default): same picks, and the same as one request at a time."""
    from epicode_edge.decoding.batch_loop import generate_batched

    s = runtime.settings(max_tokens=20, lam=1.0)
    want = [runtime.generate(p, max_tokens=20, lam=1.0) for p in PROMPTS]
    for mode in ("lazy", "sync"):
        expert_ms, amateur_ms = runtime.multiseq(3)
        with expert_ms, amateur_ms:
            got = dict(generate_batched(expert_ms, amateur_ms, runtime.expert,
                                        [(i, runtime.encode(p), s) for i, p in enumerate(PROMPTS)],
                                        amateur=mode))
            calls = amateur_ms.counters.prefill_calls + amateur_ms.counters.step_calls
        assert all(_same(got[i], w) for i, w in enumerate(want))
        assert sum(r.stats.amateur_skipped for r in got.values()) == sum(r.stats.amateur_skipped for r in want)
        if mode == "lazy":
            lazy_calls = calls
    assert calls > lazy_calls  # sync feeds slots that did not need it


def test_batched_requests_finish_independently_and_fail_alone(runtime):
    from epicode_edge.apps.batch import generate_batch

    long_prompt = "The quick brown fox jumps over the lazy dog. " * 60  # more than n_ctx = 256
    prompts = ["Hello there", long_prompt, "What is 17 + 25?", "Café crème"]
    res = generate_batch(runtime, prompts, parallel=3, max_tokens=20, return_exceptions=True)
    assert isinstance(res[1], Exception) and "context" in str(res[1])
    for p, r in zip(prompts[::2] + prompts[3:], res[::2] + res[3:]):
        assert _same(r, runtime.generate(p, max_tokens=20))

    limits = (0, 1, 5, 40, 3, 12)
    reqs = [(i, runtime.encode(p), runtime.settings(max_tokens=n)) for i, (p, n) in enumerate(zip(PROMPTS, limits))]
    got = list(runtime.stream_many(reqs, parallel=2))
    order = [k for k, _ in got]
    assert sorted(order) == list(range(len(PROMPTS))) and order != sorted(order)  # completion order
    for i, r in got:  # a slot freed by a short request takes the next one; each answer is unchanged
        assert r.completion_tokens <= limits[i]
        assert _same(r, runtime.generate(PROMPTS[i], max_tokens=limits[i]))


def test_run_batch_parallel_matches_sequential(runtime, tmp_path):
    inp = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": f"r{i}", "prompt": p, "max_tokens": 4 + 5 * (i % 3)}, ensure_ascii=False)
             for i, p in enumerate(PROMPTS)]
    lines.insert(2, "{broken")
    lines.append(json.dumps({"id": "neg", "prompt": "x", "lambda": -1}))
    lines.append(json.dumps({"id": "sys", "prompt": "Hi", "system": "Be terse.", "temp": 0.7, "seed": 2}))
    inp.write_text("\n".join(lines) + "\n")
    one, many = tmp_path / "one.jsonl", tmp_path / "many.jsonl"
    s1 = batch.run_batch(runtime, inp, one, compare=True)
    s8 = batch.run_batch(runtime, inp, many, compare=True, parallel=3)
    strip = lambda rs: sorted(({k: v for k, v in r.items() if k != "timings"} for r in rs), key=lambda r: r["line"])
    assert strip(_lines(one)) == strip(_lines(many))
    assert (s8.n_ok, s8.n_errors) == (s1.n_ok, s1.n_errors) == (len(PROMPTS) + 1, 2)


@pytest.mark.parametrize("settings", [dict(max_tokens=16), dict(max_tokens=12, lam=1.0, temp=0.7, seed=1),
                                      dict(max_tokens=20, stop=["e"])])
def test_batched_on_mlx_equals_one_after_another(bundle, settings):
    """MLX: prompts on each slot's own cache, single tokens of several slots in one (B, 1) forward over a
    left-padded batch KV cache; the same answers as one request at a time."""
    from epicode_edge.decoding.batch_loop import generate_batched
    from epicode_edge.runtime import load

    with load(bundle, backend="mlx", n_ctx=256) as rt:
        seq = [rt.generate(p, **settings) for p in PROMPTS]
        s = rt.settings(**settings)
        expert_ms, amateur_ms = rt.multiseq(4)
        with expert_ms, amateur_ms:
            got = dict(generate_batched(expert_ms, amateur_ms, rt.expert,
                                        [(i, rt.encode(p), s) for i, p in enumerate(PROMPTS)]))
            assert expert_ms.batched_forwards > 0 and amateur_ms.batched_forwards > 0
    assert all(_same(got[i], a) for i, a in enumerate(seq))


def test_stream_many_admits_as_requests_come_and_cancels(runtime):
    """A server's source: IDLE while nothing is queued (decoding goes on), requests admitted as they come,
    a cancelled request ends at once with Cancelled and frees its slot for the next one."""
    from epicode_edge.runtime import IDLE, Cancelled

    s = runtime.settings(max_tokens=12)
    want = {i: runtime.generate(p, max_tokens=12) for i, p in enumerate(PROMPTS[:3])}
    cancel = {"long"}
    seen_events: list = []

    def source():
        yield 0, runtime.encode(PROMPTS[0]), s
        yield "long", runtime.encode(PROMPTS[1]), runtime.settings(max_tokens=200)
        for _ in range(3):
            yield IDLE  # nothing queued for a few steps: the two admitted requests keep decoding
        yield 1, runtime.encode(PROMPTS[1]), s  # takes the cancelled request's slot
        yield 2, runtime.encode(PROMPTS[2]), s

    got = dict(runtime.stream_many(source(), parallel=2, on_event=lambda k, e: seen_events.append(k),
                                   cancelled=lambda k: k in cancel and seen_events.count("long") >= 2))
    assert isinstance(got["long"], Cancelled) and seen_events.count("long") == 2
    assert all(_same(got[i], want[i]) for i in want)
    fin = dict(runtime.stream_many(iter([(0, runtime.encode(PROMPTS[0]), s)]), parallel=2, finetuned=True))
    alone = runtime.compare(PROMPTS[0], max_tokens=12)
    assert fin[0].tokens == alone.tokens and fin[0].changed_tokens == 0
