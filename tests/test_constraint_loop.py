"""Structured output under contrastive decoding (decoding/constraint.py) on the real engines: every constrained
answer parses and validates (llama.cpp and MLX, single and batched: a hypothesis property over small JSON
Schemas and regexes), lambda = 0 equals llguidance's own constrained greedy decoding of the expert (the matcher
driven here by hand), forced tokens need no amateur, and an answer cut by max_tokens says it is incomplete."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from epicode_edge.decoding import constraint as C
from epicode_edge.runtime import collect, load

from rt_models import N_THREADS, bundle, bundle_dir, rt  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def rt_mlx(bundle):
    r = load(bundle, backend="mlx")
    yield r
    r.close()


# ---------------------------------------------------------------------------------------------
# strategies: small JSON Schemas and regexes whose every match is short
# ---------------------------------------------------------------------------------------------

PROPERTY = st.one_of(
    st.just({"type": "boolean"}),
    st.tuples(st.integers(-50, 50), st.integers(0, 60)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}),
    st.integers(1, 4).map(lambda n: {"type": "string", "maxLength": n}),
    st.lists(st.sampled_from(["red", "green", "x y", "7"]), min_size=1, max_size=3, unique=True).map(
        lambda v: {"enum": v}),
    st.just({"type": "array", "items": {"type": "boolean"}, "maxItems": 2}),
)
SCHEMAS = st.dictionaries(st.sampled_from(["a", "b", "name", "n_2"]), PROPERTY, min_size=1, max_size=3).map(
    lambda p: {"type": "object", "properties": p, "required": list(p), "additionalProperties": False})
REGEXES = st.lists(st.sampled_from(["[a-c]{1,3}", "(yes|no)", "[0-9]{2}", "-", "x?", "[A-Z]", " "]),
                   min_size=1, max_size=4).map("".join)

MAX_TOKENS = 160  # far more than any match of the strategies needs


def _check_schema(schema, text):
    jsonschema.validate(json.loads(text), schema)


def _check_regex(pattern, text):
    assert re.fullmatch(pattern, text), (pattern, text)


def _single_and_batched(r, constraint, prompts=("hello", "Tell me")):
    """The answers of one request at a time, then of the same requests decoded together (2 slots)."""
    s = r.settings(max_tokens=MAX_TOKENS, constraint=constraint)
    single = [r.generate(p, raw=True, max_tokens=MAX_TOKENS, constraint=constraint) for p in prompts]
    reqs = [(i, r.encode(p, raw=True), s) for i, p in enumerate(prompts)]
    batched = dict(r.stream_many(iter(reqs), parallel=2))
    return single, [batched[i] for i in range(len(prompts))]


def _assert_all_valid(results, check, spec):
    for res in results:
        assert not isinstance(res, Exception), res
        assert res.finish_reason == "stop" and res.stopped_by == "eos", (spec, res.text, res.finish_reason)
        assert res.stats.constraint_complete is True
        check(spec, res.text)


HYP = settings(max_examples=6, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("engine", ["rt", "rt_mlx"])
@HYP
@given(schema=SCHEMAS)
def test_every_schema_answer_parses_and_validates(request, engine, schema):
    r = request.getfixturevalue(engine)
    single, batched = _single_and_batched(r, {"type": "json_schema", "json_schema": {"schema": schema}})
    _assert_all_valid(single + batched, _check_schema, schema)
    # the batch's picks are the single loop's (same engine; tiny F32 models: no rounding ties)
    assert [b.tokens for b in batched] == [s.tokens for s in single]


@pytest.mark.parametrize("engine", ["rt", "rt_mlx"])
@HYP
@given(pattern=REGEXES)
def test_every_regex_answer_matches(request, engine, pattern):
    r = request.getfixturevalue(engine)
    single, batched = _single_and_batched(r, {"type": "regex", "regex": pattern})
    _assert_all_valid(single + batched, _check_regex, pattern)
    assert [b.tokens for b in batched] == [s.tokens for s in single]


def test_json_object_and_gbnf_grammar(rt):
    res = rt.generate("hi", raw=True, max_tokens=MAX_TOKENS, constraint={"type": "json_object"})
    assert isinstance(json.loads(res.text), dict) and res.finish_reason == "stop"
    g = 'root ::= "answer: " ("yes" | "no") "."'
    res = rt.generate("hi", raw=True, max_tokens=MAX_TOKENS, constraint=C.grammar(g))
    assert res.text in ("answer: yes.", "answer: no.") and res.finish_reason == "stop"


# ---------------------------------------------------------------------------------------------
# lambda = 0: llguidance's own constrained greedy decoding of the expert
# ---------------------------------------------------------------------------------------------


# llguidance's own llama.cpp tokenizer calls llama-cpp-python's deprecated llama_token_get_attr once per token
_LLGUIDANCE_TOKENIZER = pytest.mark.filterwarnings("ignore:llama_token_get_attr is deprecated:DeprecationWarning")


def _library_greedy(gguf, prompt, grammar, max_tokens):
    """llguidance's matcher driven by hand with the expert's logits (llama-cpp-python's Llama, llguidance's
    own llama.cpp tokenizer): mask, argmax over the allowed tokens, consume; no code of the loop."""
    import llama_cpp
    import llguidance
    import llguidance.numpy as lln
    from llguidance.llamacpp import lltokenizer_from_vocab

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_threads=N_THREADS, verbose=False)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        n = llama_cpp.llama_vocab_n_tokens(vocab)
        eog = [i for i in range(n) if llama_cpp.llama_vocab_is_eog(vocab, i)]
        tok = lltokenizer_from_vocab(vocab, eos_token=eog)
        m = llguidance.LLMatcher(tok, grammar, log_level=0)
        assert not m.is_error(), m.get_error()
        mask = lln.allocate_token_bitmask(1, n)
        out = []
        llm.eval(prompt)
        while len(out) < max_tokens:
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n,)).copy()
            lln.fill_next_token_bitmask(m, mask)
            lln.apply_token_bitmask_inplace(logits[None], mask)
            t = int(logits.argmax())
            if t in eog:
                break
            assert m.consume_token(t)
            out.append(t)
            llm.eval([t])
        return out
    finally:
        llm.close()


@pytest.mark.parametrize("spec", [
    {"type": "json_schema", "json_schema": {"schema": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                         "n": {"type": "integer", "minimum": 0, "maximum": 999}},
        "required": ["name", "n"], "additionalProperties": False}}},
    {"type": "regex", "regex": "[a-z]{2,6}-[0-9]{1,3}( ok)?"},
])
@_LLGUIDANCE_TOKENIZER
def test_lambda_zero_is_the_librarys_constrained_greedy(rt, bundle, spec):
    c = C.parse_constraint(spec)
    prompt = rt.encode("The quick brown fox", raw=True)
    want = _library_greedy(rt.bundle.gguf("expert", "F32"), prompt, c.grammar(), 60)
    got = rt.generate("The quick brown fox", raw=True, lam=0.0, max_tokens=60, constraint=c, fast_forward=False)
    assert got.tokens == want
    assert got.finish_reason == "stop" and len(want) < 60
    # fast-forward: the same text as a valid answer, in fewer expert forwards (forced runs in one batch)
    ff = rt.generate("The quick brown fox", raw=True, lam=0.0, max_tokens=60, constraint=c, fast_forward=True)
    assert ff.stats.constraint_complete and ff.stats.expert_forwards <= got.stats.expert_forwards


def _reference_constrained_cd(gguf_e, gguf_a, prompt, grammar, lam, alpha, max_tokens):
    """Constrained contrastive decoding by its definition, in numpy over both models' full logits (fresh
    llama-cpp-python models, llguidance's own tokenizer and matcher): allowed tokens only; a single allowed
    token taken as is; else the plausibility mask on the expert's log-softmax renormalised over the allowed
    tokens, then argmax of (1 + lam) * le - lam * la over the kept ones."""
    import llama_cpp
    import llguidance
    import llguidance.numpy as lln
    from llguidance.llamacpp import lltokenizer_from_vocab

    from epicode_edge.decoding.contrastive import log_softmax

    models = [llama_cpp.Llama(model_path=str(g), n_ctx=512, n_threads=N_THREADS, verbose=False)
              for g in (gguf_e, gguf_a)]
    try:
        vocab = llama_cpp.llama_model_get_vocab(models[0].model)
        n = llama_cpp.llama_vocab_n_tokens(vocab)
        eog = [i for i in range(n) if llama_cpp.llama_vocab_is_eog(vocab, i)]
        m = llguidance.LLMatcher(lltokenizer_from_vocab(vocab, eos_token=eog), grammar, log_level=0)
        mask = lln.allocate_token_bitmask(1, n)
        for llm in models:
            llm.eval(prompt)
        out = []
        while len(out) < max_tokens:
            xe, xa = (np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n,)).copy()
                      for llm in models)
            lln.fill_next_token_bitmask(m, mask)
            allowed = np.unpackbits(mask[0].view(np.uint8), bitorder="little")[:n].astype(bool)  # (V,)
            if allowed.sum() == 1:
                t = int(allowed.argmax())
            else:
                le = np.where(allowed, xe, -np.inf)
                le = le - np.logaddexp.reduce(le[allowed])  # (V,) log-probs over the allowed tokens
                keep = allowed & (le >= np.log(alpha) + le.max())
                s = np.where(keep, (1 + lam) * le - lam * log_softmax(xa), -np.inf)
                t = int(s.argmax())
            if t in eog:
                break
            assert m.consume_token(t)
            out.append(t)
            for llm in models:
                llm.eval([t])
        return out
    finally:
        for llm in models:
            llm.close()


@_LLGUIDANCE_TOKENIZER
@pytest.mark.parametrize("mode", [{"lazy": True}, {"lazy": False}, {"overlap": True}])
def test_constrained_cd_equals_the_numpy_reference(rt, mode):
    spec = {"type": "json_schema", "json_schema": {"schema": {
        "type": "object", "properties": {"w": {"type": "string", "maxLength": 8}, "k": {"enum": ["a", "bb", "c"]}},
        "required": ["w", "k"], "additionalProperties": False}}}
    c = C.parse_constraint(spec)
    prompt = rt.encode("Hello there", raw=True)
    want = _reference_constrained_cd(rt.bundle.gguf("expert", "F32"), rt.bundle.gguf("amateur", "F32"), prompt,
                                     c.grammar(), 1.0, 0.1, 60)
    got = rt.generate("Hello there", raw=True, lam=1.0, alpha=0.1, max_tokens=60, constraint=c, fast_forward=False,
                      catch_up="steps", **{"overlap": False, **mode})
    assert got.tokens == want and got.finish_reason == "stop"
    assert got.stats.changed > 0  # the amateur changed picks: the contrast is exercised, not just the mask
    if mode.get("overlap"):
        # the overlapped path fed the amateur every token, the forced ones at the end too (the lazy path
        # never feeds it those: no pick after them needs its logits)
        assert rt.amateur.tokens == rt.expert.tokens
        ff = rt.generate("Hello there", raw=True, lam=1.0, max_tokens=60, constraint=c, overlap=True)
        jsonschema.validate(json.loads(ff.text), json.loads(c.text))
        assert ff.stats.expert_forwards < got.stats.expert_forwards  # forced runs fed to both in one batch


# ---------------------------------------------------------------------------------------------
# the pick's rules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fast_forward", [False, True])
def test_forced_tokens_need_no_amateur_and_count_as_skipped(rt, fast_forward):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    res = rt.generate("hi", raw=True, lam=1.0, max_tokens=40, constraint=C.json_schema(schema),
                      fast_forward=fast_forward, overlap=False)  # the lazy amateur (overlap feeds it all)
    st_ = res.stats
    assert json.loads(res.text)["answer"] in ("yes", "no")
    assert st_.forced >= len('"answer":"') - 2  # the fixed key is forced (the tokenizer's pieces of it)
    assert st_.amateur_skipped >= st_.forced
    # the amateur ran once per real pick at most (forced tokens are caught up in the next pick's batch)
    assert st_.amateur_forwards <= st_.picks - st_.forced


def test_candidates_are_the_plausibility_mask_over_the_allowed_tokens():
    x = np.array([9.0, 5.0, 4.9, 1.0, 4.0, -3.0], dtype=np.float32)  # (V,)
    allowed = np.array([1, 2, 3, 4])
    got = C.candidates(x, allowed, 0.5)  # max over allowed is 5.0: keep x >= 5 + log 0.5 = 4.31
    assert got.tolist() == [1, 2]
    assert C.candidates(x, np.array([3]), 0.1).tolist() == [3]


def test_max_tokens_before_the_end_is_length_and_incomplete(rt):
    schema = {"type": "object", "properties": {"text": {"type": "string", "minLength": 50}}, "required": ["text"]}
    res = rt.generate("hi", raw=True, max_tokens=8, constraint=C.json_schema(schema))
    assert res.finish_reason == "length" and res.stats.constraint_complete is False
    assert res.timings["constraint_complete"] is False
    (_, b), = list(rt.stream_many(iter([(0, rt.encode("hi", raw=True),
                                        rt.settings(max_tokens=8, constraint=C.json_schema(schema)))]),
                                  parallel=1))
    assert b.finish_reason == "length" and b.stats.constraint_complete is False


def test_no_constraint_keeps_the_complete_field_empty(rt):
    assert rt.generate("hi", raw=True, max_tokens=3).stats.constraint_complete is None


@pytest.mark.parametrize("batched", [False, True])
def test_explain_with_a_constraint_explains_every_token(rt, batched):
    c = C.json_schema({"type": "object", "properties": {"k": {"enum": ["yes", "no"]}}, "required": ["k"]})
    kw = dict(max_tokens=40, lam=1.0, constraint=c, explain=True)
    if batched:
        (_, res), = list(rt.stream_many(iter([(0, rt.encode("hi", raw=True), rt.settings(**kw))]), parallel=1))
        events = None
    else:
        events = list(rt.stream("hi", raw=True, **kw))
        res = collect(iter(events))
    assert json.loads(res.text)["k"] in ("yes", "no")
    if events is not None:
        toks = [e for e in events if not e.final]
        assert toks and all(e.explain is not None and e.explain.token == e.token for e in toks)
        forced = [e for e in toks if len(e.explain.candidates) == 1]
        assert forced  # the fixed key's tokens: explained one by one (explain turns fast-forward off)
    assert res.stats.forced > 0
