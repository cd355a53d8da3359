"""decoding/loop.py: the streaming loop.

Loop logic that random models cannot steer (UTF-8 split across tokens, stop strings, EOS, limits, a full
context) runs on ScriptBackend, a numpy "engine" whose logits are a function of the token history. The
claims about engines (lazy amateur == naive loop, greedy contrastive == a numpy reference loop over the full
logits) run on llama.cpp and MLX with tiny real models.
"""

import math

import numpy as np
import pytest

from epicode_edge.decoding.loop import Event, common_prefix, generate_step, stream_generate
from epicode_edge.decoding.sampling import make_logits_processors, make_sampler
from epicode_edge.errors import ContextFullError, ParameterError
from rt_models import EOS, N_THREADS, VOCAB, ScriptBackend, bundle_dir, spell


def run(expert, amateur=None, prompt=b"hi", *, lam=0.0, alpha=0.1, **kw):
    prompt = list(prompt) if isinstance(prompt, (bytes, list)) else list(prompt.encode())
    events = list(stream_generate(expert, amateur, prompt, lam=lam, alpha=alpha, **kw))
    assert all(not e.final for e in events[:-1]) and events[-1].final
    return events


def text_of(events):
    return "".join(e.text for e in events)


# ----------------------------------------------------------------------------------------------
# text, stops and limits (scripted)
# ----------------------------------------------------------------------------------------------


def test_utf8_split_across_tokens_is_held_until_complete():
    answer = "é😀 ok 東"
    events = run(ScriptBackend(spell(answer, 2)))
    assert text_of(events) == answer
    assert "\ufffd" not in text_of(events)
    deltas = [e.text for e in events if e.token is not None]
    assert deltas[:3] == ["", "é", ""]  # 0xC3 held, 0xA9 completes "é", first byte of the emoji held
    assert [e.token for e in events if e.token is not None] == list(answer.encode())
    assert events[-1].finish_reason == "stop" and events[-1].stopped_by == "eos"


def test_invalid_and_truncated_utf8_become_replacement_characters():
    events = run(ScriptBackend(spell(b"\xffa\xe6\x9d", 2)), max_tokens=4)
    assert text_of(events) == "\ufffda\ufffd"
    assert events[-1].text == "\ufffd"  # the incomplete tail is flushed on the final event
    assert events[-1].stopped_by == "max_tokens" and events[-1].finish_reason == "length"


def test_eos_ends_the_answer_and_is_not_part_of_it():
    events = run(ScriptBackend(spell("abc", 2)))
    st = events[-1].stats
    assert text_of(events) == "abc" and [e.token for e in events[:-1]] == [97, 98, 99]
    assert (st.completion_tokens, st.picks, st.prompt_tokens) == (3, 4, 2)


@pytest.mark.parametrize("answer, stop, expected", [
    ("Hello STOP world", ["STOP"], "Hello "),
    ("Hello STaaa", ["STOP"], "Hello STaaa"),          # a prefix that does not complete is released
    ("abcSTOPxyzEND", ["END", "STOP"], "abc"),          # the earliest stop wins
    ("STOPnow", ["STOP"], ""),
    ("emoji 😀 after", ["😀"], "emoji "),                # a stop string inside a multi-byte character
    ("a\n\nb", ["\n\n"], "a"),
])
def test_stop_strings_are_not_emitted_even_across_tokens(answer, stop, expected):
    events = run(ScriptBackend(spell(answer, 2)), stop=stop)
    assert text_of(events) == expected
    completed = any(s in answer for s in stop)
    assert events[-1].stopped_by == ("stop_string" if completed else "eos")
    for e in events:  # nothing of a stop string was ever emitted, not even its first characters
        assert not any(s[:1] and s in text_of(events) for s in stop)


def test_stop_string_emits_nothing_early():
    events = run(ScriptBackend(spell("xxSTOP", 2)), stop=["STOP"])
    assert [e.text for e in events if e.token is not None] == ["x", "x", "", "", "", ""]


def test_max_tokens():
    e = ScriptBackend(spell("abcdefgh", 2, then_eos=False))
    events = run(e, max_tokens=3)
    assert text_of(events) == "abc" and events[-1].stopped_by == "max_tokens"
    assert e.counters.step_calls == 2  # the last pick is not fed: no wasted forward
    events = run(ScriptBackend(spell("abc", 2)), max_tokens=0)
    assert len(events) == 1 and events[0].finish_reason == "length" and events[0].stats.picks == 0


def test_full_context_ends_with_length_never_silently():
    e = ScriptBackend(spell("x" * 50, 4, then_eos=False), n_ctx=10)
    events = run(e, prompt=b"abcd", max_tokens=100)
    assert events[-1].finish_reason == "length" and events[-1].stopped_by == "context_full"
    assert events[-1].stats.completion_tokens == 10 - 4 + 1  # the last pick needs no room
    assert e.n_past == 10


def test_prompt_longer_than_the_context_is_refused_before_any_work():
    e = ScriptBackend(spell("x", 11), n_ctx=10)
    with pytest.raises(ContextFullError, match="11 tokens, more than the context of 10"):
        run(e, prompt=b"a" * 11)
    assert e.counters.forward_calls == 0
    events = run(ScriptBackend(spell("xy", 10, then_eos=False), n_ctx=10), prompt=b"a" * 10)
    assert events[-1].stopped_by == "context_full" and events[-1].stats.completion_tokens == 1


@pytest.mark.parametrize("kw, msg", [
    ({"lam": -1}, "lambda"), ({"alpha": 0}, "alpha"), ({"max_tokens": -1}, "max_tokens"),
    ({"stop": [""]}, "stop strings"), ({"prompt": []}, "empty"), ({"prompt": [VOCAB]}, "outside the vocabulary"),
])
def test_bad_arguments_fail_before_any_forward(kw, msg):
    e = ScriptBackend(spell("x", 2))
    with pytest.raises(ParameterError, match=msg):
        run(e, **kw)
    assert e.counters.forward_calls == 0


def test_an_amateur_is_required_when_lambda_is_positive():
    with pytest.raises(ParameterError, match="amateur"):
        next(generate_step(ScriptBackend(spell("x", 2)), None, [1, 2], lam=0.5, alpha=0.1))


# ----------------------------------------------------------------------------------------------
# cache reuse, interruption (scripted)
# ----------------------------------------------------------------------------------------------


def test_a_second_prompt_feeds_only_what_differs_from_the_cache():
    e = ScriptBackend(lambda seq: np.eye(VOCAB, dtype=np.float32)[EOS if len(seq) > 12 else 120])
    run(e, prompt=b"abcdefgh")  # caches abcdefgh + xxxx (the EOS pick is not fed)
    e.reset_counters()
    events = run(e, prompt=b"abcdefZZ")
    assert events[-1].stats.expert_prefill_tokens == 2 and e.counters.truncations == 1
    e.reset_counters()
    run(e, prompt=b"abcdefZZ")  # identical prompt: the last token is fed again to get its logits
    assert e.counters.prefill_tokens == 1


def test_closing_the_stream_early_stops_the_work():
    e = ScriptBackend(spell("abcdefgh", 2, then_eos=False))
    stream = stream_generate(e, None, [1, 2], lam=0.0, alpha=0.1, max_tokens=100)
    assert next(stream).text == "a"
    stream.close()
    assert e.counters.step_calls == 0 and e.n_past == 2


def test_an_interrupted_forward_leaves_a_usable_cache():
    calls = {"n": 0}

    def fn(seq):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return np.eye(VOCAB, dtype=np.float32)[100]

    e = ScriptBackend(fn)
    with pytest.raises(KeyboardInterrupt):
        run(e, prompt=b"abc", max_tokens=10)
    assert e.n_past == 4 and e._dirty  # prompt + one step; the interrupted step is not counted
    events = run(e, prompt=b"abcd", max_tokens=2)
    assert text_of(events) == "dd" and e.n_past == 5


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([1, 2], [1, 2]) == 2


# ----------------------------------------------------------------------------------------------
# lazy amateur == naive loop (scripted: steered masks)
# ----------------------------------------------------------------------------------------------


def steered_expert(seq):
    """Odd positions: one dominant token (a forced pick); even positions: three close candidates."""
    x = np.full(VOCAB, -20.0, dtype=np.float32)
    h = (sum((i + 1) * t for i, t in enumerate(seq)) * 2654435761) % 200
    if len(seq) % 2:
        x[h] = 10.0
    else:
        x[[h, h + 1, h + 2]] = [1.0, 0.9, 0.8]
    x[EOS] = -30.0
    return x


def history_amateur(seq):
    """Logits that depend on the whole history: a wrong catch-up would change the picks."""
    rng = np.random.default_rng(abs(hash(tuple(seq))) % (2 ** 32))
    return rng.standard_normal(VOCAB).astype(np.float32) * 2


@pytest.mark.parametrize("catch_up", ["batch", "steps"])
@pytest.mark.parametrize("sampling", [{}, {"temp": 0.9, "seed": 11}, {"temp": 1.5, "seed": 3, "top_k": 2}])
def test_lazy_amateur_equals_naive_loop_scripted(sampling, catch_up):
    out = {}
    for lazy in (True, False):
        e, a = ScriptBackend(steered_expert), ScriptBackend(history_amateur)
        events = run(e, a, prompt=b"prompt", lam=1.0, alpha=0.5, max_tokens=40, lazy=lazy, catch_up=catch_up,
                     sampler=make_sampler(**{"temp": 0.0, **sampling}))
        out[lazy] = ([(ev.token, ev.changed) for ev in events[:-1]], events[-1].stats, a)
    assert out[True][0] == out[False][0]
    lazy_st, naive_st = out[True][1], out[False][1]
    assert lazy_st.amateur_skipped == 20 and naive_st.amateur_skipped == 0  # every other pick is forced
    assert lazy_st.amateur_forwards < naive_st.amateur_forwards or catch_up == "steps"
    assert lazy_st.changed == naive_st.changed > 0  # contrast does change picks here


def test_lambda_zero_never_runs_the_amateur():
    e, a = ScriptBackend(steered_expert), ScriptBackend(history_amateur)
    events = run(e, a, prompt=b"xy", lam=0.0, alpha=0.5, max_tokens=10)
    assert a.counters.forward_calls == 0 and events[-1].stats.skip_rate == 1.0
    assert not any(ev.changed for ev in events)


def test_repetition_penalty_applies_to_the_contrastive_scores():
    def expert(seq):  # prefers "a" slightly over "b" every time
        x = np.full(VOCAB, -20.0, dtype=np.float32)
        x[[97, 98]] = [1.0, 0.9]
        return x

    plain = run(ScriptBackend(expert), prompt=b"x", max_tokens=4)
    penal = run(ScriptBackend(expert), prompt=b"x", max_tokens=4,
                processors=make_logits_processors(repetition_penalty=1.5))
    last_one = run(ScriptBackend(expert), prompt=b"x", max_tokens=4,
                   processors=make_logits_processors(repetition_penalty=1.5, repetition_context_size=1))
    assert text_of(plain) == "aaaa" and text_of(penal) == "abaa" and text_of(last_one) == "abab"


def test_event_stats_are_consistent():
    e, a = ScriptBackend(steered_expert), ScriptBackend(history_amateur)
    st = run(e, a, prompt=b"prompt", lam=1.0, alpha=0.5, max_tokens=20)[-1].stats
    assert st.picks == 20 and st.completion_tokens == 20
    assert 0 < st.ttft_s <= st.total_s and st.decode_s > 0
    assert st.expert_forwards == 20 and st.expert_prefill_tokens == 6
    assert math.isclose(st.skip_rate, 0.5)
    assert st.loop_overhead_s >= 0 and st.overhead_us_per_token > 0
    assert set(st.as_dict()) >= {"tokens_per_s", "skip_rate", "overhead_us_per_token", "ttft_s"}


# ----------------------------------------------------------------------------------------------
# real engines: the reference loop and lazy == naive
# ----------------------------------------------------------------------------------------------

PROMPTS = ["The quick brown fox", "Question: what is 17 + 25? Answer:"]


@pytest.fixture(scope="module", params=["llama.cpp", "mlx"])
def engine(request, tmp_path_factory):
    b = bundle_dir(tmp_path_factory)
    if request.param == "llama.cpp":
        from epicode_edge.backends.llamacpp import LlamaCppBackend

        models = [LlamaCppBackend(b / f"gguf/{r}-F32.gguf", n_ctx=256, n_threads=N_THREADS, kv_type="f32")
                  for r in ("expert", "amateur")]
    else:
        from epicode_edge.backends.mlx import MLXBackend

        models = [MLXBackend(b / f"mlx/{r}", n_ctx=256) for r in ("expert", "amateur")]
    yield models
    for m in models:
        m.close()


def ref_log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def reference_loop(expert, amateur, prompt, lam, alpha, n):
    """Plain numpy contrastive decoding: full logits of both models recomputed from scratch every step."""
    seq, out = list(prompt), []
    for _ in range(n):
        expert.truncate(0)
        le = ref_log_softmax(expert.prefill(seq))
        amateur.truncate(0)
        la = ref_log_softmax(amateur.prefill(seq))
        keep = le >= np.log(alpha) + le.max()
        s = np.where(keep, (1 + lam) * le - lam * la, -np.inf)
        t = int(np.argmax(s))
        out.append(t)
        if t in expert.eos_ids:
            break
        seq.append(t)
    return out


@pytest.mark.parametrize("lam, alpha", [(0.5, 0.1), (1.0, 0.01), (0.1, 0.5)])
def test_greedy_contrastive_equals_a_numpy_reference_loop(engine, lam, alpha):
    expert, amateur = engine
    for text in PROMPTS:
        prompt = expert.tokenize(text)
        ref = reference_loop(expert, amateur, prompt, lam, alpha, 24)
        events = list(stream_generate(expert, amateur, prompt, lam=lam, alpha=alpha, max_tokens=24))
        got = [e.token for e in events[:-1]]
        if events[-1].stopped_by == "eos":
            got.append(ref[-1])  # the EOS pick is not an answer token
        assert got == ref


@pytest.mark.parametrize("catch_up", ["steps", "batch", "auto"])
@pytest.mark.parametrize("sampling", [{}, {"temp": 0.8, "seed": 1}, {"temp": 1.2, "seed": 7, "top_p": 0.9}])
def test_lazy_amateur_equals_naive_loop_on_engines(engine, sampling, catch_up):
    expert, amateur = engine
    skipped = 0
    for text in PROMPTS:
        prompt = expert.tokenize(text)
        runs = {}
        for lazy in (True, False):
            for b in engine:
                b.truncate(0)
            events = list(stream_generate(expert, amateur, prompt, lam=0.5, alpha=0.3, max_tokens=32, lazy=lazy,
                                          catch_up=catch_up, sampler=make_sampler(**{"temp": 0.0, **sampling})))
            runs[lazy] = ([(e.token, e.changed) for e in events[:-1]], events[-1].stats)
        assert runs[True][0] == runs[False][0]
        skipped += runs[True][1].amateur_skipped
        assert runs[False][1].amateur_skipped == 0
        if catch_up == "batch":  # "auto" chooses batch or steps from measured timings: load-dependent
            assert runs[True][1].amateur_forwards < runs[False][1].amateur_forwards
    assert skipped > 0  # alpha = 0.3 makes single-token masks happen on these models


@pytest.mark.parametrize("catch_up", ["steps", "batch"])
@pytest.mark.parametrize("sampling", [{}, {"temp": 0.8, "seed": 1}])
def test_candidate_head_picks_as_the_whole_head(engine, monkeypatch, sampling, catch_up):
    """candidate_head (the default): the amateur's logits of the plausible candidates only. The same picks as
    with its whole output layer, lazy and naive; on MLX the amateur's whole layer never runs (its K rows do,
    and catch-up forwards whose logits are unread run none); with a repetition penalty (normalized scores)
    the whole layer runs again."""
    expert, amateur = engine
    whole_calls = []
    if amateur.partial_head:
        head = amateur._head
        monkeypatch.setattr(amateur, "_head", lambda h: whole_calls.append(1) or head(h))
    for text in PROMPTS:
        prompt = expert.tokenize(text)
        runs = {}
        for lazy in (True, False):
            for cand in (True, False):
                for b in engine:
                    b.truncate(0)
                n = len(whole_calls)
                events = list(stream_generate(expert, amateur, prompt, lam=0.5, alpha=0.3, max_tokens=24, lazy=lazy,
                                              catch_up=catch_up, candidate_head=cand,
                                              sampler=make_sampler(**{"temp": 0.0, **sampling})))
                runs[lazy, cand] = [(e.token, e.changed) for e in events[:-1]]
                if amateur.partial_head:
                    assert (len(whole_calls) > n) == (not cand), (lazy, cand)
        assert runs[True, True] == runs[True, False] == runs[False, True] == runs[False, False]
    if amateur.partial_head:
        n = len(whole_calls)
        amateur.truncate(0)
        list(stream_generate(expert, amateur, expert.tokenize(PROMPTS[0]), lam=0.5, alpha=0.3, max_tokens=8,
                             lazy=False, processors=make_logits_processors(1.3, 20)))
        assert len(whole_calls) > n


def test_steps_catch_up_repeats_the_naive_loops_engine_calls(tmp_path_factory):
    """catch_up="steps": the amateur sees the naive loop's exact sequence of engine calls (prompt in one
    batch, then one token per call), so its logits are bit-identical (here: a Q8_0 model). The steps whose
    logits are never read ask llama.cpp for no output (its output layer skipped); the others are the naive
    loop's logits, bit for bit."""
    from epicode_edge.backends.llamacpp import LlamaCppBackend

    b = bundle_dir(tmp_path_factory)
    expert, amateur = (LlamaCppBackend(b / f"gguf/{r}-Q8_0.gguf", n_ctx=256, n_threads=N_THREADS)
                       for r in ("expert", "amateur"))
    seen = {}
    for lazy in (True, False):
        calls, logits = [], {}
        decode, forward = amateur._decode, amateur._forward

        def _decode(ids, output=True, f=decode, c=calls):
            c.append((amateur.n_past, len(ids), output))
            return f(ids, output)

        def _forward(ids, f=forward, d=logits):
            x = f(ids)
            d[amateur.n_past + len(ids)] = x.copy()
            return x

        amateur._decode, amateur._forward = _decode, _forward
        for bk in (expert, amateur):
            bk.truncate(0)
        prompt = expert.tokenize(PROMPTS[1])
        events = list(stream_generate(expert, amateur, prompt, lam=0.5, alpha=0.3, max_tokens=40, lazy=lazy,
                                      catch_up="steps"))
        seen[lazy] = ([e.token for e in events[:-1]], calls, logits)
        del amateur._decode, amateur._forward
    (lazy_tokens, lazy_calls, lazy_logits), (naive_tokens, naive_calls, naive_logits) = seen[True], seen[False]
    assert lazy_tokens == naive_tokens
    assert [c[:2] for c in lazy_calls] == [c[:2] for c in naive_calls[:len(lazy_calls)]]
    assert all(out for *_, out in naive_calls)
    assert any(not out for *_, out in lazy_calls)  # unread catch-up steps: no output layer
    assert lazy_logits and all(np.array_equal(x, naive_logits[n]) for n, x in lazy_logits.items())
    expert.close()
    amateur.close()


def test_bad_catch_up_mode():
    with pytest.raises(ParameterError, match="catch_up must be one of"):
        run(ScriptBackend(spell("x", 2)), catch_up="lazy")


def test_event_is_a_small_dataclass():
    ev = Event("a", 5)
    assert not ev.final and ev.timings is None


def test_forward_costs_choose_batches_unless_measured_dearer():
    from epicode_edge.backends.base import ForwardCosts

    c = ForwardCosts()
    assert c.batch_is_cheaper(3)  # unknown: try it
    c.record(1, 1.0)
    c.record(3, 2.0)
    assert c.batch_is_cheaper(3)
    c.record(2, 5.0)
    decisions = [c.batch_is_cheaper(2) for _ in range(32)]
    assert decisions.count(True) == 2 and decisions[15] and decisions[31]  # re-measured now and then
    c.record(2, 0.0)
    assert c.seconds(2) == 3.5  # a running mean: one fast sample does not flip the choice
    for _ in range(4):
        c.record(2, 0.0)
    assert c.batch_is_cheaper(2)
    c.record(100, 1.0)
    assert c.seconds(100) is None


@pytest.mark.parametrize("batch_cost", [1e-6, 1.0])
def test_catch_up_by_steps_or_by_batch_gives_the_same_tokens(batch_cost):
    runs = []
    for lazy in (True, False):
        e, a = ScriptBackend(steered_expert), ScriptBackend(history_amateur)
        a.costs.record(1, 1e-3)
        for k in range(2, 33):
            a.costs.record(k, batch_cost)  # 1.0: batches look dear, the amateur catches up by steps
        events = run(e, a, prompt=b"prompt", lam=1.0, alpha=0.5, max_tokens=30, lazy=lazy)
        runs.append(([ev.token for ev in events[:-1]], a.counters))
    assert runs[0][0] == runs[1][0]
    lazy_counters = runs[0][1]
    assert (lazy_counters.prefill_calls > 1) == (batch_cost < 1)  # the prompt is one prefill either way


def test_a_lambda_zero_request_leaves_the_amateur_cache_alone():
    e, a = ScriptBackend(steered_expert), ScriptBackend(history_amateur)
    run(e, a, prompt=b"abcdef", lam=1.0, alpha=0.5, max_tokens=4)
    cached = a.tokens
    run(e, a, prompt=b"xyz", lam=0.0, alpha=0.5, max_tokens=4)
    assert a.tokens == cached and a.counters.truncations == 0
