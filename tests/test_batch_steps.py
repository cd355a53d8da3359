"""Batched decoding's two engine-side choices (backends/multiseq.py, decoding/batch_loop.py):

- one-token entries of a step decoded in one engine call or one call each (StepGrouping: fixed, or measured);
- a prefix another slot holds (a shared system prompt) copied into a slot instead of computed again.

The policy is tested with given timings; the engines on the tiny llama bundle (llama.cpp, real contexts)."""

from __future__ import annotations

import numpy as np
import pytest

from epicode_edge.backends.multiseq import StepGrouping
from epicode_edge.decoding.batch_loop import SHARE_MIN, generate_batched
from epicode_edge.decoding.loop import collect, common_prefix
from epicode_edge.errors import ParameterError
from rt_models import N_THREADS, bundle_dir

PROMPTS = ["What is 17 + 25?", "The quick brown fox", "Café crème, naïve façade", "def add(a, b):"]


# ---------------------------------------------------------------------------------------------
# the policy (given timings, no engine)
# ---------------------------------------------------------------------------------------------


def test_fixed_modes_and_bad_mode():
    assert StepGrouping("grouped").split(4) is False and StepGrouping("split").split(4) is True
    assert StepGrouping("split").split(1) is False  # one entry is one call either way
    with pytest.raises(ParameterError, match="batch_steps must be one of auto, grouped, split, got 'x'"):
        StepGrouping("x")


@pytest.mark.parametrize("one, many, want_split", [(0.010, 0.050, True), (0.010, 0.020, False)])
def test_auto_measures_both_ways_then_keeps_the_faster(one, many, want_split):
    g, n = StepGrouping("auto"), StepGrouping.SAMPLES
    assert g.split(1) is False and g.faster_split(4) is None
    assert g.split(4) is True  # no timing of one entry yet: a split step gives four at once
    for _ in range(4):
        g.record(1, one)
    for _ in range(n):
        assert g.split(4) is False  # now the grouped way, SAMPLES times
        g.record(4, many)
    assert g.faster_split(4) is want_split
    ways = [g.split(4) for _ in range(3 * StepGrouping.RECHECK)]
    # the faster way, but every RECHECK-th step of 4 entries the other, to see a change of load
    assert ways.count(not want_split) == 3 and ways.count(want_split) == len(ways) - 3
    # a step of 3 entries and another thread count are measured on their own
    assert g.faster_split(3) is None and g.faster_split(4, key=(2, 2)) is None
    assert g.split(4, key=(2, 2)) is True


def test_auto_follows_a_change_of_cost():
    g = StepGrouping("auto")
    for _ in range(StepGrouping.SAMPLES):
        g.record(1, 0.010)
        g.record(2, 0.030)
    assert g.faster_split(2) is True
    for _ in range(StepGrouping.KEEP):  # the grouped way got cheaper (another load on the machine)
        g.record(2, 0.012)
    assert g.faster_split(2) is False


# ---------------------------------------------------------------------------------------------
# llama.cpp engine
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return bundle_dir(tmp_path_factory)


def _load(bundle, **kw):
    from epicode_edge.runtime import load

    return load(bundle, quant="F32", n_ctx=256, n_threads=N_THREADS, backend="llama.cpp", **kw)


def _calls(ms):
    """Count the engine calls (llama_decode) of a batched llama.cpp form."""
    seen = []
    run = ms._decode_rows
    ms._decode_rows = lambda rows: seen.append(len(rows)) or run(rows)
    return seen


@pytest.mark.parametrize("mode", ["split", "grouped"])
def test_steps_split_or_grouped_give_the_single_sequence_logits(bundle, mode):
    """Both ways give each slot the logits the single-sequence backend gives for the same tokens; a split step
    is one llama_decode per slot, a grouped one a single call."""
    with _load(bundle, batch_steps=mode) as rt:
        e = rt.expert
        prompts = [rt.encode(p) for p in PROMPTS[:3]]
        want = []
        for p in prompts:
            e.truncate(0)
            want.append([e.prefill(p).copy(), e.step(7).copy(), e.step(11).copy()])
        with e.multiseq(n_slots=3) as ms:
            calls = _calls(ms)
            for k, p in enumerate(prompts):
                ms.decode([(k, p)])
            del calls[:]
            for i, t in enumerate((7, 11)):
                got = ms.decode([(k, [t]) for k in range(3)])
                for k in range(3):
                    if mode == "split":  # one token, one output row: a single-sequence context's step
                        assert np.array_equal(got[k], want[k][i + 1]), (k, t)
                    else:
                        assert np.abs(got[k] - want[k][i + 1]).max() < 1e-4
            assert calls == ([1] * 6 if mode == "split" else [3, 3])


def test_auto_steps_use_what_was_measured(bundle):
    with _load(bundle) as rt:
        e = rt.expert
        assert e.batch_steps.mode == "auto"
        prompts = [rt.encode(p) for p in PROMPTS[:3]]
        with e.multiseq(n_slots=3) as ms:
            calls = _calls(ms)
            for k, p in enumerate(prompts):
                ms.decode([(k, p)])
            for t in range(12):
                ms.decode([(k, [t + 5]) for k in range(3)])
            key = ms.threads
            assert e.batch_steps.faster_split(3, key) is not None  # both ways were timed on real steps
            # the timings live on the backend: a later batched form starts from them. Make one way much
            # faster on record and see it used
            for _ in range(StepGrouping.KEEP):
                e.batch_steps.record(1, 1e-6, key)
            del calls[:]
            ms.decode([(k, [3]) for k in range(3)])
            assert calls == [1, 1, 1]
        with e.multiseq(n_slots=3) as ms2:
            calls = _calls(ms2)
            ms2.decode([(k, p) for k, p in enumerate(prompts) if k == 0])
            ms2.decode([(1, prompts[1][:4])])
            ms2.decode([(2, prompts[2][:4])])
            del calls[:]
            ms2.decode([(k, [3]) for k in range(3)])
            assert calls == [1, 1, 1]


def test_copy_prefix_gives_the_logits_of_computing_it(bundle):
    with _load(bundle) as rt:
        e = rt.expert
        system = rt.encode("You answer in one word. " * 3)
        p, q = system + rt.encode(PROMPTS[0]), system + rt.encode(PROMPTS[1])
        k = common_prefix(p, q)
        assert k >= len(system) - 1 and k >= SHARE_MIN
        e.truncate(0)
        want = e.prefill(q).copy()
        with e.multiseq(n_slots=3) as ms:
            assert ms.can_copy
            ms.decode([(0, p)])
            ms.decode([(2, p[:5])])
            assert ms.copy_prefix(0, 2, k)  # over a slot that held something else
            assert ms.tokens(2) == q[:k] and ms.tokens(0) == p
            got = ms.decode([(2, q[k:])])[0]
            assert np.abs(got - want).max() < 1e-4
            ms.truncate(1, 0)
            cold = ms.decode([(1, q[k:])])[0]  # the suffix alone: the copy is what made the difference
            assert np.abs(cold - want).max() > 1e-2
            step = ms.decode([(0, [7])])[0]  # the source slot goes on as it was
            e.truncate(0)
            e.prefill(p)
            assert np.abs(step - e.step(7)).max() < 1e-4
            for args in [(0, 0, 1), (0, 3, 1), (1, 0, len(q) + 1)]:
                with pytest.raises(ParameterError):
                    ms.copy_prefix(*args)


def test_batched_requests_share_a_system_prompt_and_answer_as_one_at_a_time(bundle):
    """Requests that arrive together with one system prompt: the first is decoded, the others wait one step
    and copy its prefix (each model prefills the shared part once); the answers are those of one at a time."""
    with _load(bundle) as rt:
        system = rt.encode("You answer in one word. " * 3)
        prompts = [system + rt.encode(p) for p in PROMPTS]
        s = rt.settings(max_tokens=10, lam=1.0)
        want = []
        for p in prompts:
            rt.expert.truncate(0), rt.amateur.truncate(0)
            want.append(collect(rt.stream_ids(p, s)).tokens)
        shared = [common_prefix(prompts[0], p[:-1]) for p in prompts[1:]]
        assert min(shared) >= SHARE_MIN
        for overlap in (False, True):
            expert_ms, amateur_ms = rt.multiseq(4)
            with expert_ms, amateur_ms:
                got = dict(generate_batched(expert_ms, amateur_ms, rt.expert,
                                            [(i, p, s) for i, p in enumerate(prompts)], overlap=overlap))
                for ms in (expert_ms, amateur_ms):
                    assert ms.counters.prefill_tokens == len(prompts[0]) + sum(
                        len(p) - n for p, n in zip(prompts[1:], shared)), (overlap, ms)
            assert [got[i].tokens for i in range(len(prompts))] == want


def test_stream_many_keeps_its_contexts_for_the_next_call(bundle):
    """The batched forms stay open between stream_many calls: the next call's prompts find their prefixes
    cached (one token to feed); a call beside one in flight, an abandoned call and release_batched() do not
    leave a cache behind for the next."""
    with _load(bundle) as rt:
        s = rt.settings(max_tokens=4)
        prompts = [rt.encode(p, raw=True) for p in PROMPTS[:3]]  # no shared prefix to copy
        want = [collect(rt.stream_ids(p, s)).tokens for p in prompts]

        def run(parallel=3):  # one request per slot: request i takes slot i
            got = dict(rt.stream_many([(i, p, s) for i, p in enumerate(prompts[:parallel])], parallel=parallel))
            assert [got[i].tokens for i in range(parallel)] == want[:parallel]
            return [got[i].stats.expert_prefill_tokens for i in range(parallel)]

        full = [len(p) for p in prompts]
        assert run() == full
        assert run() == [1, 1, 1]  # kept: each slot holds its prompt (the last position is fed again)
        assert run(parallel=2) == full[:2]  # other slots: new forms (the old ones closed)
        assert run(parallel=2) == [1, 1]
        inner = rt.stream_many([(9, prompts[0], s)], parallel=2)
        next(inner)  # in flight: a call beside it gets forms of its own
        assert run(parallel=2) == full[:2]
        list(inner)
        assert run(parallel=2) == [1, 1]
        g = rt.stream_many([(0, prompts[0], s), (1, prompts[1], s)], parallel=2)
        next(g)
        g.close()  # abandoned: its forms are closed, not kept
        assert run(parallel=2) == full[:2]
        rt.release_batched()
        assert run(parallel=2) == full[:2]


def test_release_during_a_call_closes_its_forms_at_the_end(bundle):
    with _load(bundle) as rt:
        s = rt.settings(max_tokens=3)
        p = rt.encode(PROMPTS[0], raw=True)
        g = rt.stream_many([(0, p, s)], parallel=1)
        next(g)
        rt.release_batched()
        list(g)
        again = dict(rt.stream_many([(0, p, s)], parallel=1))
        assert again[0].stats.expert_prefill_tokens == len(p)  # nothing was kept from the released call


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_shared_prefix_on_sliding_window_models(tmp_path, arch):
    """Gemma's caches hold a sliding-window part beside the full one (llama.cpp's iSWA cache): the prefix
    copy between slots covers both, and batched answers with a shared prefix equal one request at a time."""
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("transformers")
    from factory import make_spm_tokenizer

    from epicode_edge.converters.convert import convert
    from epicode_edge.runtime import load

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                  max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    cfg = T.Gemma2Config(**common) if arch == "gemma2" else \
        T.Gemma3TextConfig(**common, layer_types=["sliding_attention", "full_attention"])
    model = T.AutoModelForCausalLM.from_config(cfg)
    tok = make_spm_tokenizer(tmp_path / "tok")
    g = torch.Generator().manual_seed(3)
    dirs = []
    for name in ("ft", "inf"):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g) if p.ndim == 1 else
                        torch.randn(p.shape, generator=g) * (1.5 / p.shape[-1] ** 0.5))
        model.save_pretrained(tmp_path / name, safe_serialization=True)
        for f in tok.iterdir():
            (tmp_path / name / f.name).write_bytes(f.read_bytes())
        dirs.append(tmp_path / name)
    bundle = convert(*dirs, tmp_path / "b", mu=0.5, to=["gguf"], quant=["F32"]).path
    with load(bundle, n_ctx=256, n_threads=N_THREADS, kv_type="f32") as rt:
        system = list(range(5, 40))  # longer than the sliding window
        prompts = [system + [50 + i, 60 + i, 70 + i] for i in range(4)]
        s = rt.settings(max_tokens=12, lam=1.0)
        want = []
        for p in prompts:
            rt.expert.truncate(0), rt.amateur.truncate(0)
            want.append(collect(rt.stream_ids(p, s)).tokens)
        got = dict(rt.stream_many([(i, p, s) for i, p in enumerate(prompts)], parallel=3))
        assert [got[i].tokens for i in range(4)] == want
        # the first prompt decoded whole, the others copied its prefix (their last 3 positions computed)
        assert [got[i].stats.expert_prefill_tokens for i in range(4)] == [len(prompts[0]), 3, 3, 3]


def test_prompts_use_the_prompt_threads_and_steps_of_several_slots_the_decode_threads(bundle, monkeypatch):
    """A batched form runs prompts (several tokens per slot, one slot or more) with the single-sequence
    context's (decode, prompt) threads, as fast as one request at a time runs them, and a step of several
    slots with the decode count for both (llama.cpp counts it as a batch; all cores for it spin at barriers on
    a busy CPU)."""
    import llama_cpp

    from epicode_edge.runtime import load

    with load(bundle, quant="F32", n_ctx=256, backend="llama.cpp", batch_steps="grouped") as rt:
        e = rt.expert
        gen, prompt = e._threads_at_load
        applied, calls = [], []
        real = llama_cpp.llama_set_n_threads
        monkeypatch.setattr(llama_cpp, "llama_set_n_threads", lambda ctx, a, b: applied.append((a, b)) or real(ctx, a, b))
        with e.multiseq(n_slots=3) as ms:
            assert ms.threads == (gen, prompt)
            run = ms._decode_rows
            ms._decode_rows = lambda rows: calls.append((len({r[0] for r in rows}), ms._applied)) or run(rows)
            p = [rt.encode(x, raw=True) for x in PROMPTS[:3]]
            ms.decode([(0, p[0])])
            ms.decode([(1, p[1][:3]), (2, p[2][:3])])  # two slots' prompts of one length: one call
            ms.decode([(k, [5]) for k in range(3)])  # a step of three slots
            ms.decode([(0, [6])])
        assert calls == [(1, (gen, prompt)), (2, (gen, prompt)), (3, (gen, gen)), (1, (gen, prompt))]
        assert applied == ([] if gen == prompt else [(gen, gen), (gen, prompt)])  # set only when it changes
