"""Hostile inputs, second round: batch outputs that are not ours (left exactly as they were), retry-errors
through a symlinked output, unbounded reads (an endless line, an output that is a device), lambda and
repetition penalty at the edge of float range, a system prompt larger than the context, and PEFT adapter
configs that crashed, hung or passed silently."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
from cli_helpers import assert_one_line_error, cli

from epicode_edge.apps import batch
from epicode_edge.errors import ContextFullError, InputError

# ---------------------------------------------------------------------------------------------
# batch: an output that is not ours is refused and left as it was
# ---------------------------------------------------------------------------------------------


def _input(tmp_path, n=2):
    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"p{i}"}) + "\n" for i in range(n)))
    return p


def _snapshot(path):
    st = os.stat(path)
    return path.read_bytes(), st.st_size, st.st_mtime_ns


FOREIGN = {
    "json-no-newline": b'{"keep":"me"}',
    "json-our-keys-no-line": b'{"id": 1, "text": "x"}',  # JSON with some of our keys is still not a record
    "json-array": b'[{"id": 1, "line": 1, "text": "x"}]',
    "text": b"my notes, one line",
    "binary": bytes(range(256)) * 4096,  # 1 MiB, newlines inside
    "binary-no-newline": bytes(b for b in range(256) if b != 10) * 4096,
    "our-start-then-garbage": b'{"id": "q0", "line": 1, "text": "x"}\x00\x01 trailing bytes',
    "our-start-then-bad-json": b'{"id": "q0", "line": 1,, "text',
    "record-then-foreign-tail": b'{"id": "q0", "line": 1, "text": "x"}\n{"keep": "me"',
    "utf8-broken-inside": b'{"id": "q0", "line": 1, "text": "\xff\xfe abc',
}


@pytest.mark.parametrize("case", sorted(FOREIGN))
def test_an_output_that_is_not_ours_is_refused_untouched(tmp_path, case):
    out = tmp_path / "out.jsonl"
    out.write_bytes(FOREIGN[case])
    before = _snapshot(out)
    with pytest.raises(InputError, match=r"out.jsonl line \d+ is not a result record"):
        batch.prepare(_input(tmp_path), out)
    with pytest.raises(InputError, match="not a result record"):
        batch.prepare(_input(tmp_path), out, retry_errors=True)
    assert _snapshot(out) == before


def test_the_cli_leaves_a_one_line_json_file_as_it_was(tmp_path):
    out = tmp_path / "notes.json"
    out.write_bytes(b'{"keep":"me"}')
    code, text = cli("batch", tmp_path / "no-bundle", _input(tmp_path), "-o", out)
    assert_one_line_error(code, text, "notes.json line 1 is not a result record")
    assert out.read_bytes() == b'{"keep":"me"}'


def _record_line(**extra):
    rec = {"id": "q1", "line": 2, "text": "caf\u00e9 \u6771\u4eac \"q\" \\ \n\x01", "finish_reason": "length",
           "prompt_tokens": 16, "completion_tokens": 4, "changed_tokens": 0,
           "timings": {"ttft_s": 0.0105, "decode_s": 1.5e-05, "total_s": 0.0139}, **extra}
    return batch.dumps_record(rec).encode("utf-8")


def test_every_cut_of_one_of_our_records_is_repaired(tmp_path):
    """A write cut short anywhere (even inside a UTF-8 character or an escape) is the only tail that is cut."""
    good = batch.dumps_record({"id": "q0", "line": 1, "text": "x"}).encode()
    inp = _input(tmp_path)
    for line in (_record_line(), batch.dumps_record({"id": None, "line": 7, "error": "line 7: bad"}).encode()):
        for cut in range(1, len(line) - 1):
            out = tmp_path / f"out{cut}.jsonl"
            out.write_bytes(good + line[:cut])
            with batch.prepare(inp, out) as job:
                assert job.repaired and "truncated" in job.repaired, (cut, line[:cut])
            assert out.read_bytes() == good


# ---------------------------------------------------------------------------------------------
# batch --retry-errors through a symlinked output
# ---------------------------------------------------------------------------------------------


def test_retry_errors_rewrites_through_a_symlinked_output(tmp_path):
    inp = _input(tmp_path)
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "results.jsonl"
    target.write_text(json.dumps({"id": "q0", "line": 1, "error": "boom"}) + "\n"
                      + json.dumps({"id": "q1", "line": 2, "text": "ok"}) + "\n")
    link = tmp_path / "out.jsonl"
    link.symlink_to(target)
    with batch.prepare(inp, link, retry_errors=True) as job:
        assert [r.id for r in job.pending] == ["q0"]
        job.out.append(batch.dumps_record({"id": "q0", "line": 1, "text": "again"}).encode())
    assert link.is_symlink() and os.readlink(link) == str(target)  # still the link
    assert [json.loads(x) for x in target.read_text().splitlines()] == [
        {"id": "q1", "line": 2, "text": "ok"}, {"id": "q0", "line": 1, "text": "again"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl", "real"]
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["results.jsonl"]  # no temp file left


# ---------------------------------------------------------------------------------------------
# unbounded reads: an endless input line, an output that is a device
# ---------------------------------------------------------------------------------------------


def test_an_endless_input_line_stops_at_the_limit(tmp_path, monkeypatch):
    """/dev/zero as input: refused after MAX_LINE_BYTES, not read to the end of memory. A FIFO fed 2x the
    limit (and never closed) shows the read stops early: it would block forever on reading further."""
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    import threading

    def feed():
        with open(fifo, "wb") as f:
            try:
                f.write(b"x" * (2 * batch.MAX_LINE_BYTES))  # the reader closes before taking it all
            except BrokenPipeError:
                pass

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    with pytest.raises(InputError, match=rf"in.fifo: line 1 is longer than {batch.MAX_LINE_BYTES} bytes"):
        batch.read_input(fifo)
    t.join(10)
    assert not t.is_alive()
    with pytest.raises(InputError, match="line 1 is longer than"):
        batch.read_input("/dev/zero")
    ok = tmp_path / "ok.jsonl"  # a line of exactly the limit is read
    ok.write_bytes(b"y" * batch.MAX_LINE_BYTES + b"\n" + b"z" * batch.MAX_LINE_BYTES)
    assert len(batch.read_input(ok)) == 2 * batch.MAX_LINE_BYTES + 1


@pytest.mark.parametrize("device", ["/dev/full", "/dev/zero", "/dev/null", "fifo"])
def test_an_output_that_is_not_a_regular_file_is_refused(tmp_path, device):
    if device == "fifo":
        device = tmp_path / "out.fifo"
        os.mkfifo(device)
    elif not os.path.exists(device):
        pytest.skip(f"no {device} here")
    with pytest.raises(InputError, match="not a regular file"):
        batch.prepare(_input(tmp_path), device)
    code, text = cli("batch", tmp_path / "no-bundle", _input(tmp_path), "-o", device)
    assert_one_line_error(code, text, str(device), "not a regular file")
    if isinstance(device, os.PathLike):
        assert stat.S_ISFIFO(os.stat(device).st_mode)


# ---------------------------------------------------------------------------------------------
# chat: an endless stdin line, a system prompt larger than the context
# ---------------------------------------------------------------------------------------------

from rt_models import N_THREADS, bundle, rt  # noqa: E402,F401 - fixtures

from epicode_edge.apps import chat  # noqa: E402


class EndlessText:
    """A text stream of `size` characters ("x" lines of `line` characters each, or one line without a newline),
    made as it is read (nothing held), counting what the reader took."""

    def __init__(self, size: int, line: int | None = None, head: str = ""):
        self.left, self.line, self.taken, self.head = size, line, 0, head

    def readline(self, limit: int = -1) -> str:
        if self.head:
            out, self.head = self.head, ""
            return out
        n = self.left if self.line is None else min(self.left, self.line)
        if limit is not None and limit >= 0:
            n = min(n, limit)
        self.left -= n
        self.taken += n
        return "x" * n + ("\n" if self.line is not None and n == self.line else "")

    def isatty(self) -> bool:
        return False


def test_an_endless_chat_line_stops_at_the_limit(rt):  # noqa: F811
    app = chat.ChatApp(rt, out=lambda s: None, err=lambda s: None, max_tokens=2)
    stdin = EndlessText(2 * chat.MAX_LINE_CHARS)  # one line of twice the limit, no newline
    with pytest.raises(InputError, match=rf"stdin line 1 is longer than {chat.MAX_LINE_CHARS} characters"):
        chat.run_repl(app, stdin=stdin, interactive=False)
    assert stdin.taken <= chat.MAX_LINE_CHARS + 1
    stdin = EndlessText(2 * chat.MAX_LINE_CHARS, line=1000, head='"""\n')  # a triple-quoted message, no end
    with pytest.raises(InputError, match=rf"longer than {chat.MAX_LINE_CHARS} characters \(the limit per message"):
        chat.run_repl(app, stdin=stdin, interactive=False)
    assert stdin.taken <= chat.MAX_LINE_CHARS + 1000
    assert app.session.history == []


def test_chat_from_an_endless_pipe_is_one_line_error(bundle):  # noqa: F811
    code, text = cli("chat", bundle, "--quant", "F32", "--threads", N_THREADS, "--max-tokens", 2,
                     input=b"\0" * (2 * chat.MAX_LINE_CHARS))
    assert_one_line_error(code, text, "stdin line 1 is longer than", str(chat.MAX_LINE_CHARS))


def _system_tokens(rt, system):  # noqa: F811
    turn = [{"role": "system", "content": system}, {"role": "user", "content": ""}]
    return len(rt.expert.tokenize(rt.render(turn), special=True, add_bos=False))


def test_a_system_prompt_larger_than_the_context_is_refused_when_set(rt):  # noqa: F811
    err = []
    app = chat.ChatApp(rt, out=lambda s: None, err=err.append, system="Be terse.", max_tokens=4)
    huge = "word " * 200_000  # 1 MB
    app.handle("/system " + huge.strip())
    assert f"context ({rt.expert.n_ctx} tokens)" in err[-1] and err[-1].startswith("Error: the system prompt")
    assert app.session.system == "Be terse."  # kept out
    assert app.answer("Hello there").tokens > 0  # the session still answers
    # the bound: the system prompt with an empty turn, plus room for max_tokens (at most half the context)
    n_ctx = rt.expert.n_ctx
    system = "word " * 300
    n = _system_tokens(rt, system)
    assert n_ctx // 2 < n < n_ctx
    session = rt.chat(max_tokens=n_ctx - n)
    session.set_system(system)
    assert session.system == system
    session = rt.chat(max_tokens=n_ctx - n + 1)
    with pytest.raises(ContextFullError, match=f"takes {n} tokens with the chat template, more than the "
                                               f"{n - 1} of the context"):
        session.set_system(system)
    assert session.system is None
    with pytest.raises(ContextFullError, match="the system prompt takes"):
        rt.chat(system=huge, max_tokens=4)


def test_chat_refuses_a_huge_system_prompt_at_start(bundle):  # noqa: F811
    code, text = cli("chat", bundle, "--quant", "F32", "--threads", N_THREADS, "--max-tokens", 2,
                     "--system", "word " * 5000, input="Hello\n")
    assert_one_line_error(code, text, "the system prompt takes", "context (2048 tokens)")


# ---------------------------------------------------------------------------------------------
# lambda and repetition_penalty at the edge of float range
# ---------------------------------------------------------------------------------------------

import math  # noqa: E402
import warnings  # noqa: E402
from fractions import Fraction  # noqa: E402

import numpy as np  # noqa: E402
from rt_models import VOCAB, ScriptBackend  # noqa: E402

from epicode_edge.decoding.contrastive import check_lam  # noqa: E402
from epicode_edge.decoding.loop import stream_generate  # noqa: E402
from epicode_edge.decoding.sampling import MAX_REPETITION_PENALTY, make_logits_processors  # noqa: E402
from epicode_edge.defaults import MAX_LAMBDA  # noqa: E402
from epicode_edge.errors import ParameterError  # noqa: E402

CANDIDATES = np.arange(97, 103)  # six bytes a..f, all within log(10) of the best: all plausible at alpha 0.1


def _close_pair(seq):
    """Expert x and amateur y whose differences x - y on the candidates are equal but for a few float32 ulps:
    at lambda 1e6 those ulps weigh as much as the expert's own spread, and float32 keeps none of them."""
    rng = np.random.default_rng(len(seq))
    x = np.full(VOCAB, -30.0, dtype=np.float32)
    x[CANDIDATES] = 4.0 + rng.uniform(0, 0.5, len(CANDIDATES)).astype(np.float32)
    y = x.copy()
    y[CANDIDATES] = (x[CANDIDATES] - np.float32(1.0)) + rng.integers(-3, 4, len(CANDIDATES)) * np.spacing(
        np.float32(4.0))
    return x, y


def _exact_picks(prompt, lam, n, alpha=0.1):
    """The formula in exact rational arithmetic on the same float32 logits: argmax (1 + lam) x - lam y over
    the plausible ids (raw logits: the log-normalisers shift every candidate alike)."""
    seq, out, lam = list(prompt), [], Fraction(lam)
    for _ in range(n):
        x, y = _close_pair(seq)
        ids = np.flatnonzero(x >= x.max() + math.log(alpha))
        s = [(1 + lam) * Fraction(float(x[i])) - lam * Fraction(float(y[i])) for i in ids]
        assert len(set(s)) == len(s)  # no ties: the pick is the formula's alone
        out.append(int(ids[int(np.argmax(s))]))
        seq.append(out[-1])
    return out


def test_the_largest_lambda_picks_what_the_exact_formula_says():
    prompt = [1, 2, 3]
    expert = ScriptBackend(lambda seq: _close_pair(seq)[0])
    amateur = ScriptBackend(lambda seq: _close_pair(seq)[1])
    with warnings.catch_warnings(), np.errstate(all="raise"):  # no overflow, no invalid value, no warning
        warnings.simplefilter("error")
        events = list(stream_generate(expert, amateur, prompt, lam=MAX_LAMBDA, alpha=0.1, max_tokens=40))
    got = [e.token for e in events[:-1]]
    ref = _exact_picks(prompt, MAX_LAMBDA, 40)
    assert got == ref
    own = [int(np.argmax(_close_pair(prompt + got[:i])[0])) for i in range(40)]
    assert sum(a != b for a, b in zip(got, own)) >= 10  # the contrast decides here, not the expert alone


@pytest.mark.parametrize("lam", [MAX_LAMBDA * (1 + 1e-15), 1e39, 1e308, float("inf")])
def test_lambda_beyond_the_limit_is_refused_everywhere(lam, tmp_path):
    from epicode_edge.converters.convert import check_decoding_defaults
    from epicode_edge.runtime import Settings

    for check in (check_lam, lambda v: Settings().updated(lam=v), lambda v: check_decoding_defaults(v, 0.1)):
        with pytest.raises(ParameterError, match=re.escape(f"lambda must be a finite number >= 0 and at most "
                                                            f"{MAX_LAMBDA:g}")):
            check(lam)
    assert check_lam(MAX_LAMBDA) == MAX_LAMBDA
    line = batch.parse_line(json.dumps({"id": 1, "prompt": "x", "lambda": lam}).encode(), 1)
    assert isinstance(line, batch.Request)  # the line parses; its settings are checked when it runs:
    with pytest.raises(ParameterError, match="lambda must be"):
        Settings().updated(**line.settings)


def test_lambda_beyond_the_limit_on_the_command_line_and_in_chat(bundle, rt):  # noqa: F811
    code, text = cli("generate", bundle, "hi", "--lambda", "1e39")
    assert_one_line_error(code, text, "lambda must be a finite number >= 0 and at most 1e+06, got 1e+39")
    err = []
    app = chat.ChatApp(rt, out=lambda s: None, err=err.append, max_tokens=2)
    app.handle("/set lambda 1e308")
    assert err[-1].startswith("Error: lambda must be a finite number >= 0 and at most 1e+06")
    assert app.session.settings.lam == rt.defaults.lam
    app.handle(f"/set lambda {MAX_LAMBDA:g}")
    assert app.session.settings.lam == MAX_LAMBDA
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        assert app.answer("Hello there").tokens == 2


def test_repetition_penalty_is_bounded_and_finite_at_its_limits():
    m = MAX_REPETITION_PENALTY
    for bad in (m * 2, 1e308, 1 / m / 2, 1e-308, 0.0, float("inf")):
        with pytest.raises(ParameterError, match="repetition_penalty must be a number > 0, from 1e-06 to 1e"):
            make_logits_processors(bad)
    prompt = [97, 98, 99]
    for penalty in (m, 1 / m):
        expert = ScriptBackend(lambda seq: _close_pair(seq)[0])
        amateur = ScriptBackend(lambda seq: _close_pair(seq)[1])
        with warnings.catch_warnings(), np.errstate(all="raise"):
            warnings.simplefilter("error")
            events = list(stream_generate(expert, amateur, prompt, lam=MAX_LAMBDA, alpha=0.1, max_tokens=20,
                                          processors=make_logits_processors(penalty, 3)))
        got = [e.token for e in events[:-1]]
        assert len(got) == 20 and set(got) <= set(CANDIDATES.tolist())
        if penalty == m:  # a huge penalty: no token of the last three comes back while others are plausible
            seq = prompt + got
            assert all(seq[i] not in seq[i - 3:i] for i in range(len(prompt), len(seq)))


# ---------------------------------------------------------------------------------------------
# PEFT adapter configs
# ---------------------------------------------------------------------------------------------

import shutil  # noqa: E402
import time  # noqa: E402

from epicode_edge.converters import lora  # noqa: E402
from epicode_edge.errors import CheckpointError, MismatchError  # noqa: E402


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    from factory import make_hf_model, make_lora_pair

    root = tmp_path_factory.mktemp("lora-hostile")
    base = make_hf_model(root / "base", seed=1)
    ft, inf = make_lora_pair(root / "ok", base, rank=4, seed=1)
    return {"base": base, "ft": ft, "inf": inf}


def _edit(src, dst, config=None, tensors=None):
    """A copy of adapter src with config keys updated and/or its tensors changed by tensors(dict) -> dict."""
    from epicode_edge.converters.safetensors_io import SafetensorsFile, to_f32, write_safetensors

    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))  # Infinity / NaN as Python's json writes them
    if tensors is not None:
        f = SafetensorsFile(dst / "adapter_model.safetensors")
        t = {n: np.array(to_f32(f.read(n), f.entries[n].dtype)) for n in f.entries}
        f.close()
        write_safetensors(dst / "adapter_model.safetensors", {n: (a, "F32") for n, a in tensors(t).items()})
    return dst


def _rank(t, r):
    """Every pair cut (or padded with zeros) to rank r."""
    out = {}
    for n, a in t.items():
        if ".lora_A." in n:
            out[n] = np.zeros((r, a.shape[1]), np.float32)
            out[n][: min(r, a.shape[0])] = a[:r]
        else:
            out[n] = np.zeros((a.shape[0], r), np.float32)
            out[n][:, : min(r, a.shape[1])] = a[:, :r]
    return out


BAD_ADAPTERS = {  # case -> (config update, tensor change, error class, message fragment)
    "rank-0": (None, lambda t: _rank(t, 0), CheckpointError, "has rank 0"),
    "r-infinity": ({"r": float("inf")}, None, InputError, "field 'r' must be a positive integer"),
    "r-fraction": ({"r": 4.5}, None, InputError, "field 'r' must be a positive integer"),
    "alpha-nan": ({"lora_alpha": float("nan")}, None, InputError, "'lora_alpha' must be a positive number"),
    "alpha-beyond-f32": ({"lora_alpha": 1e39}, None, InputError, "'lora_alpha' must be a positive number of at most"),
    "pattern-bad-regex": ({"alpha_pattern": {"q_proj(": 2.0}}, None, InputError,
                          "alpha_pattern key 'q_proj(' is not a valid regular expression"),
    "pattern-string-value": ({"alpha_pattern": {"q_proj": "16"}}, None, InputError,
                             "alpha_pattern['q_proj'] must be a positive number"),
    "pattern-not-object": ({"rank_pattern": ["q_proj"]}, None, InputError, "'rank_pattern' must be an object"),
    "rank-pattern-zero": ({"rank_pattern": {"q_proj": 0}}, None, InputError,
                          "rank_pattern['q_proj'] must be a positive integer"),
    "r-16-rank-4": ({"r": 16}, None, MismatchError, "has rank 4, but adapter_config.json gives r = 16"),
    "rank-pattern-disagrees": ({"rank_pattern": {"layers\\.1\\.mlp\\.up_proj": 8}}, None, MismatchError,
                               "model.layers.1.mlp.up_proj.lora_A.weight' has rank 4, but adapter_config.json "
                               "gives r = 8"),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_a_bad_adapter_config_is_one_line(adapters, tmp_path, case):
    config, tensors, cls, fragment = BAD_ADAPTERS[case]
    ad = _edit(adapters["ft"], tmp_path / "ad", config, tensors)
    out = tmp_path / "bundle"
    with pytest.raises(cls) as e:
        lora.convert_lora(adapters["base"], ad, adapters["inf"], out, mu=0.5, quant="F32")
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg and str(ad) in msg
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))


def test_a_rank_pattern_that_agrees_is_accepted_and_scaled_as_peft_does(adapters, tmp_path):
    """rank_pattern / alpha_pattern keys match as PEFT's get_pattern_key: the module name ends in the pattern
    (after a dot), the first key in order wins; the scale is alpha / r of the matched values."""
    ad = _edit(adapters["ft"], tmp_path / "ad", {"r": 8, "rank_pattern": {"q_proj": 4, ".*": 4},
                                                 "alpha_pattern": {"layers.1.mlp.up_proj": 2.0, "proj": 99.0}})
    a = lora.read_adapter(ad)
    assert a.scales["model.layers.1.mlp.up_proj.weight"] == 2.0 / 4
    assert a.scales["model.layers.0.mlp.up_proj.weight"] == 8.0 / 4  # "proj" is not a whole name part
    a.close()


def test_a_catastrophic_alpha_pattern_is_refused_in_bounded_time(adapters, tmp_path):
    """(.|..|...)*[^a-z_.0-9] never matches a module name and backtracks exponentially in its length: re.match
    (PEFT's) runs for minutes on model.layers.1.self_attn.q_proj. The matches share a bound; past it, one line."""
    pattern = "(.|..|...)*[^a-z_.0-9]"
    ad = _edit(adapters["ft"], tmp_path / "ad", {"alpha_pattern": {"q_proj": 2.0, pattern: 3.0}})
    t0 = time.monotonic()
    with pytest.raises(InputError) as e:
        lora.convert_lora(adapters["base"], ad, adapters["inf"], tmp_path / "bundle", mu=0.5, quant="F32")
    took = time.monotonic() - t0
    assert f"alpha_pattern key {pattern!r} takes more than {lora.PATTERN_SECONDS:g} s to match" in str(e.value)
    assert str(ad) in str(e.value) and took < 15
    assert not (tmp_path / "bundle").exists()


def test_lora_alpha_too_large_for_the_base_is_refused_at_convert(adapters, tmp_path):
    """lora_alpha 1e30: finite tensors, finite float32 alpha, and every answer NaN: convert runs each role
    with its adapters (as --merge runs each merged model) and refuses in one line, writing nothing."""
    ad = _edit(adapters["ft"], tmp_path / "ad", {"lora_alpha": 1e30})
    out = tmp_path / "bundle"
    code, text = cli("convert", "--base", adapters["base"], "--finetuned", ad, "--inferior", adapters["inf"],
                     "--mu", "0.5", "--quant", "F32", "-o", out)
    assert_one_line_error(code, text, "gives non-finite logits", str(ad), "lora_alpha / r")
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))
    code, text = cli("convert", "--base", adapters["base"], "--finetuned", adapters["ft"], "--inferior",
                     adapters["inf"], "--mu", "0.5", "--quant", "F32", "-o", out)
    assert code == 0, text  # the same adapters at their own alpha pass the same check
