"""Answer extraction, data loading and statistics (pure functions, known values)."""

import json

import pytest

from epicode_edge.apps import tasks
from epicode_edge.errors import InputError, ParameterError


# ---------------------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("text,want", [
    ("7 + 5 = 12. 12 * 3 = 36. 36 - 4 = 32. Answer: 32", "32"),
    ("The total is 1,234 apples.", "1234"),
    ("it drops to -17 degrees", "-17"),
    ("pi is about 3.14.", "3.14"),
    ("no digits here", None),
])
def test_last_number(text, want):
    assert tasks.last_number(text) == want


def test_last_number_grading_is_numeric():
    assert tasks.is_correct("32.0", "32", "last-number")
    assert tasks.is_correct("1234", "1,234", "last-number")
    assert not tasks.is_correct("33", "32", "last-number")
    assert not tasks.is_correct(None, "32", "last-number")


def test_exact():
    f = tasks.make_extractor("exact")
    assert f("  Paris.\n") == "Paris"
    assert tasks.is_correct(f("Paris  is\nnice."), "Paris is nice", "exact")
    assert not tasks.is_correct(f("paris"), "Paris", "exact")
    assert f("   ") is None


@pytest.mark.parametrize("text,want", [
    ("I think the answer is (C).", "C"),
    ("Answer: b", "B"),
    ("A is wrong, so D", "D"),
    ("none", None),
])
def test_choice(text, want):
    assert tasks.choice(text) == want


def test_choice_grading():
    assert tasks.is_correct("C", "(c)", "choice")
    assert not tasks.is_correct("B", "C", "choice")


def test_regex_group_and_last_match():
    f = tasks.make_extractor(r"regex:Answer:\s*(\w+)")
    assert f("Answer: foo ... Answer: bar") == "bar"
    assert f("nothing") is None
    g = tasks.make_extractor(r"regex:\d+")
    assert g("a 1 b 22") == "22"
    assert tasks.is_correct(f("Answer: yes"), "yes", r"regex:Answer:\s*(\w+)")


@pytest.mark.parametrize("spec", ["regex:", "regex:(", "numbers", ""])
def test_bad_extract_spec(spec):
    with pytest.raises(ParameterError):
        tasks.make_extractor(spec)


# ---------------------------------------------------------------------------------------------- data
def _write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_load_items_prompt_messages_and_numbers(tmp_path):
    p = _write(tmp_path, [
        json.dumps({"id": "a", "prompt": "Compute 1 + 1.", "answer": "2"}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "hi?"}], "answer": 3}),
    ])
    items = tasks.load_items(p)
    assert [i.id for i in items] == ["a", "1"]
    assert items[0].chat() == [{"role": "user", "content": "Compute 1 + 1."}]
    assert items[1].answer == "3" and items[1].prompt is None and items[1].text == "hi?"
    assert len(tasks.load_items(p, limit=1)) == 1


@pytest.mark.parametrize("line,msg", [
    ('{"prompt": "x"}', "line 2: no 'answer'"),
    ('{"answer": "1"}', "line 2: no 'prompt' or 'messages'"),
    ('{"prompt": "x", "answer": ""}', "line 2: 'answer' must be"),
    ('{"prompt": "x", "answer": "1"', "line 2: invalid JSON"),
    ('{"messages": [], "answer": "1"}', "line 2: 'messages' must be"),
    ('{"id": "a", "prompt": "x", "answer": "1"}', "line 2: duplicate id 'a'"),
])
def test_load_items_errors_name_the_line(tmp_path, line, msg):
    p = _write(tmp_path, [json.dumps({"id": "a", "prompt": "ok", "answer": "1"}), line])
    with pytest.raises(InputError, match=msg.replace("(", r"\(").replace("[", r"\[")) as e:
        tasks.load_items(p)
    assert "\n" not in str(e.value) and str(p) in str(e.value)


def test_load_items_empty_and_missing(tmp_path):
    with pytest.raises(InputError, match="no items"):
        tasks.load_items(_write(tmp_path, ["", "  "]))
    with pytest.raises(InputError, match="no such data file"):
        tasks.load_items(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("k,n,lo,hi", [
    (5, 10, 0.2366, 0.7634),   # textbook value
    (0, 10, 0.0, 0.2775),      # upper = z^2 / (n + z^2)
    (10, 10, 0.7225, 1.0),
    (81, 263, 0.2553, 0.3662),  # Newcombe (1998), Stat Med 17:857, example 81/263
])
def test_wilson_known_values(k, n, lo, hi):
    got = tasks.wilson(k, n)
    assert got[0] == pytest.approx(lo, abs=1e-4) and got[1] == pytest.approx(hi, abs=1e-4)


@pytest.mark.parametrize("b,c,p", [
    (1, 6, 0.125),            # 2 * (1 + 7) / 128
    (0, 5, 0.0625),           # 2 / 32
    (2, 10, 158 / 4096),      # 2 * (1 + 12 + 66) / 2^12
    (3, 3, 1.0),
    (0, 0, 1.0),
])
def test_mcnemar_exact_known_values(b, c, p):
    assert tasks.mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)
    assert tasks.mcnemar_exact(c, b) == pytest.approx(p, rel=1e-12)


def test_discordant_counts():
    a = [True, True, False, False, True]
    b = [True, False, True, True, False]
    assert tasks.discordant(a, b) == (2, 2)
    with pytest.raises(ValueError):
        tasks.discordant([True], [])


def test_paired_bootstrap():
    a, b = [False] * 50, [True] * 50
    assert tasks.paired_bootstrap(a, b) == (1.0, 1.0, 1.0)
    x = [True, False] * 100
    mean, lo, hi = tasks.paired_bootstrap(x, x[::-1], seed=1)
    assert mean == 0.0 and lo < 0 < hi
    assert tasks.paired_bootstrap(x, x[::-1], seed=1) == (mean, lo, hi)  # seeded


def test_too_small_warning():
    assert tasks.too_small_warning(500) is None
    msg = tasks.too_small_warning(20, "dev set")
    assert "dev set has only 20 items" in msg and "+/-" in msg
