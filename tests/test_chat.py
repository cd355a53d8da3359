"""Chat REPL: command parsing and settings (pure), then scripted sessions on real engines."""

from __future__ import annotations

import io

import pytest

from epicode_edge.apps import chat
from epicode_edge.errors import ParameterError

# ---------------------------------------------------------------------------------------------
# parsing (no engine)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line, name, arg", [
    ("/help", "help", ""), ("/?", "help", ""), ("/bye", "bye", ""), ("/exit", "bye", ""),
    ("  /set temp 0.7 ", "set", "temp 0.7"), ("/system You are terse.", "system", "You are terse."),
    ("/SHOW", "show", ""), ("/compare", "compare", ""), ("/frobnicate x", "unknown", "frobnicate"),
])
def test_parse_command(line, name, arg):
    assert chat.parse_command(line) == chat.Command(name, arg)


@pytest.mark.parametrize("line", ["hello", "", "  ", "//not a command", "a /set b"])
def test_messages_are_not_commands(line):
    assert chat.parse_command(line) is None


def test_parse_setting_values_and_errors():
    assert chat.parse_setting("lambda", "0.3") == ("lam", 0.3)
    assert chat.parse_setting("temperature", "0") == ("temp", 0.0)
    assert chat.parse_setting("top_k", "40") == ("top_k", 40)
    assert chat.parse_setting("seed", "none") == ("seed", None)
    assert chat.parse_setting("max_tokens", "12") == ("max_tokens", 12)
    for name, value, msg in [("alpha", "0", "alpha must be in"), ("alpha", "1.5", "alpha must be in"),
                             ("lambda", "-1", "lambda must be"), ("temp", "hot", "temp must be a number"),
                             ("top_p", "0", "top_p must be in"), ("top_k", "2.5", "top_k must be an integer"),
                             ("min_p", "2", "min_p must be in"), ("max_tokens", "-1", "max_tokens must be an integer >= 0"),
                             ("seed", "-5", "seed must be"), ("lambda", "nan", "lambda must be a number"),
                             ("beam", "3", "unknown setting 'beam'")]:
        with pytest.raises(ParameterError, match=msg):
            chat.parse_setting(name, value)


def _reader(text):
    return chat._pipe_reader(io.StringIO(text))


def test_read_message_triple_quotes():
    r = _reader('"""first\nsecond\nthird"""\nnext\n"""one line"""\n')
    assert chat.read_message(r) == "first\nsecond\nthird"
    assert chat.read_message(r) == "next"
    assert chat.read_message(r) == "one line"
    with pytest.raises(EOFError):
        chat.read_message(r)


# ---------------------------------------------------------------------------------------------
# real engine (llama.cpp on a tiny F32 bundle)
# ---------------------------------------------------------------------------------------------

import os  # noqa: E402
import signal  # noqa: E402

from click.testing import CliRunner  # noqa: E402

MAX = 8  # answer length of every turn (random tiny models rarely stop on their own)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from factory import make_pair

    from epicode_edge.converters.convert import convert

    root = tmp_path_factory.mktemp("chat")
    ft, inf = make_pair(root, arch="llama", seed=3)
    return convert(ft, inf, root / "bundle", mu=0.5, to=("gguf",), quant=("F32",), lam=0.5).path


@pytest.fixture(scope="module")
def runtime(bundle):
    from epicode_edge.runtime import load

    with load(bundle, n_ctx=512, n_threads=1) as rt:
        yield rt


class Capture:
    def __init__(self):
        self.out, self.err = [], []

    def app(self, runtime, **kw):
        kw.setdefault("max_tokens", MAX)
        return chat.ChatApp(runtime, out=self.out.append, err=self.err.append, **kw)

    @property
    def stdout(self):
        return "".join(self.out)

    @property
    def stderr(self):
        return "".join(self.err)


def test_scripted_session_through_stdin(bundle, monkeypatch):
    """The CLI reads a piped script: two turns, a bad /set (error line, session goes on), a good /set,
    /stats, /compare, /show, then /bye ends it (the line after it is never sent)."""
    import epicode_edge.runtime as runtime_mod

    from epicode_edge.cli import main

    held = {}
    real_load = runtime_mod.load

    def load(*a, **kw):
        held["rt"] = real_load(*a, **kw)
        return held["rt"]

    monkeypatch.setattr(runtime_mod, "load", load)
    script = "Hello there\n/set temp hot\n/set top_p 0\n/set lambda 0.25\nWhat is 17 + 25?\n/stats\n/compare\n" \
             "/show\n/frobnicate\n/bye\nnever sent\n"
    res = CliRunner().invoke(main, ["chat", str(bundle), "--max-tokens", str(MAX), "--n-ctx", "512",
                                    "--threads", "1", "--system", "Be terse."], input=script)
    assert res.exit_code == 0, res.output
    err = res.stderr
    assert err.count(f"[{MAX} tokens, ") == 2  # tokens/s after each answer
    assert "Error: temp must be a number, got 'hot'" in err
    assert "Error: top_p must be in (0, 1]" in err
    assert "Set lambda = 0.25" in err
    assert "turns: 2" in err and "changed by contrastive decoding:" in err
    assert "lambda=0.25" in err and "system: 'Be terse.'" in err and "backend: llama.cpp (F32)" in err
    assert "Unknown command /frobnicate" in err
    assert "--- EpiCoDe ---" in res.stdout and "--- finetuned alone ---" in res.stdout
    rt = held["rt"]
    assert rt.expert.counters.prefill_calls >= 2


def test_second_turn_prefills_only_new_tokens(runtime):
    cap = Capture()
    app = cap.app(runtime)
    e, a = runtime.expert, runtime.amateur
    app.handle("Hello there")
    first = app.session.last
    assert first.completion_tokens == MAX
    p1 = first.prompt_tokens
    cached_e, cached_a = e.tokens, a.tokens
    c0 = (e.counters.prefill_tokens, a.counters.prefill_tokens, e.counters.truncations, a.counters.truncations)
    assert len(cached_e) >= p1 + MAX - 1  # the prompt and the answer (its last pick may not be fed yet)

    app.handle("What is 17 + 25?")
    second = app.session.last
    # the new tokens of turn 2, counted independently: the rendering's new text after turn 1's prompt + answer
    msgs = [{"role": "user", "content": "Hello there"}]
    r1 = runtime.render(msgs)
    r2 = runtime.render(msgs + [{"role": "assistant", "content": first.text},
                                {"role": "user", "content": "What is 17 + 25?"}])
    assert r2.startswith(r1 + first.text)
    new = e.tokenize(r2[len(r1 + first.text):], special=True, add_bos=False)
    assert second.prompt_tokens == p1 + MAX + len(new)
    prefilled_e = e.counters.prefill_tokens - c0[0]
    assert prefilled_e == second.prompt_tokens - len(cached_e) <= len(new) + 1
    assert second.stats.expert_prefill_tokens == prefilled_e
    assert e.counters.truncations == c0[2] and a.counters.truncations == c0[3]  # nothing in the caches dropped
    assert e.tokens[:len(cached_e)] == cached_e and a.tokens[:len(cached_a)] == cached_a
    # the amateur catches up lazily: never more than what it had not seen, plus this turn's answer
    prefilled_a = a.counters.prefill_tokens - c0[1]
    assert prefilled_a <= second.prompt_tokens - len(cached_a) + MAX
    assert f"prefilled {prefilled_e} (expert)" in app.stats_text()


def test_compare_is_the_finetuned_model_alone(runtime, bundle):
    """/compare on a one-turn conversation = greedy decoding of the amateur GGUF by llama-cpp-python itself."""
    from epicode_edge.backends.cpu_kernels import open_llama

    cap = Capture()
    app = cap.app(runtime)
    app.handle("Tell me about Zürich")
    app.handle("/compare")
    out = cap.stdout
    epicode, _, alone = out.partition("--- EpiCoDe ---\n")[2].partition("\n--- finetuned alone ---\n")
    assert epicode == app.last_answer
    ids = runtime.encode("Tell me about Zürich")
    llm = open_llama(runtime.amateur.path, n_ctx=512, n_threads=1, verbose=False)
    want = []
    for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if t in runtime.amateur.eos_ids or len(want) == MAX:
            break
        want.append(t)
    text = b"".join(runtime.amateur.token_bytes(t) for t in want).decode("utf-8", errors="replace")
    assert alone == text + "\n"
    # the session goes on after /compare (it used the amateur's cache)
    turn = app.answer("And Tokyo?")
    assert turn.tokens == MAX and not turn.stopped


def _interrupting(send, after, how):
    """A wrapper of the real session.send that stops the stream after `after` events: by raising
    KeyboardInterrupt from the token stream, or by a real SIGINT to this process."""

    def wrapped(text, **kw):
        inner = send(text, **kw)
        try:
            for i, ev in enumerate(inner, start=1):
                yield ev
                if i == after:  # the app asked for the next event
                    if how == "raise":
                        raise KeyboardInterrupt
                    os.kill(os.getpid(), signal.SIGINT)  # the app stops after showing the next one
        finally:
            inner.close()

    return wrapped


@pytest.mark.parametrize("how", ["raise", "signal"])
def test_ctrl_c_stops_the_answer_and_keeps_the_session(runtime, how):
    cap = Capture()
    app = cap.app(runtime)
    real_send = app.session.send
    app.session.send = _interrupting(real_send, 3, how)
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN when started in the background
    turn = app.answer("Hello there")
    assert turn.stopped and turn.tokens == (3 if how == "raise" else 4)
    assert ", stopped]" in cap.stderr
    partial = app.last_answer
    assert app.session.history[-1] == {"role": "assistant", "content": partial}  # kept, as documented
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored
    app.session.send = real_send
    turn = app.answer("What is 17 + 25?")
    assert turn.tokens == MAX and not turn.stopped
    assert [m["role"] for m in app.session.history] == ["user", "assistant"] * 2
    # the second answer is exactly what a fresh session gives for the same conversation
    fresh = runtime.chat(max_tokens=MAX)
    fresh.history = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": partial}]
    assert fresh.ask("What is 17 + 25?").text == app.last_answer


def test_reset_system_and_bye(runtime):
    cap = Capture()
    app = cap.app(runtime, system="Be terse.")
    app.handle("Hello there")
    app.handle("/system You are a pirate.")
    assert app.session.system == "You are a pirate." and len(app.session.history) == 2
    app.handle("/reset")
    assert app.session.history == [] and app.session.system == "You are a pirate."
    app.handle("/compare")
    assert "Nothing to compare yet" in cap.stderr
    chat.run_repl(app, stdin=io.StringIO("//etc/hosts\n\n/bye\nnot sent\n"), interactive=False)
    assert len(app.session.history) == 2 and app.session.history[0]["content"] == "/etc/hosts"


def test_a_message_too_long_for_the_context_fails_alone(runtime):
    cap = Capture()
    app = cap.app(runtime)
    app.handle("Hello there")
    assert app.answer("word " * 400) is None  # more than n_ctx = 512 tokens
    assert "Error: " in cap.stderr and "context" in cap.stderr and "/reset" in cap.stderr
    assert len(app.session.history) == 2  # the failed turn left no trace
    turn = app.answer("What is 17 + 25?")
    assert turn.tokens == MAX and len(app.session.history) == 4


def test_structured_output_in_every_answer(bundle, tmp_path):
    """chat --regex / --json-schema: every answer of the session matches (as generate and batch); /compare's
    finetuned answer too; a bad pattern is one line before the model loads."""
    import json
    import re

    from epicode_edge.cli import main

    script = "Hello there\nWhat is 17 + 25?\n/compare\n/show\n/bye\n"
    res = CliRunner().invoke(main, ["chat", str(bundle), "--max-tokens", "40", "--n-ctx", "512", "--threads", "1",
                                    "--regex", "[0-9]{1,3}( [a-z]+)?"], input=script)
    assert res.exit_code == 0, res.output
    answers = [x for x in res.stdout.split("\n") if x.strip() and not x.startswith("---")]
    assert len(answers) == 4  # two turns, then /compare's two answers
    assert all(re.fullmatch(r"[0-9]{1,3}( [a-z]+)?", a.strip()) for a in answers), answers
    assert "constraint=regex '[0-9]{1,3}( [a-z]+)?'" in res.stderr  # /show says it
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "boolean"}}, "required": ["n"],
                                  "additionalProperties": False}))
    res = CliRunner().invoke(main, ["chat", str(bundle), "--max-tokens", "40", "--n-ctx", "512", "--threads", "1",
                                    "--json-schema", str(schema)], input="Hello there\n/bye\n")
    assert res.exit_code == 0, res.output
    assert isinstance(json.loads(res.stdout.strip())["n"], bool)
    res = CliRunner().invoke(main, ["chat", str(bundle), "--regex", "(", "--threads", "1"], input="/bye\n")
    assert res.exit_code != 0 and res.stderr.startswith("Error: ") and res.stderr.count("\n") == 1
