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
                             ("min_p", "2", "min_p must be in"), ("max_tokens", "0", "max_tokens must be"),
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
