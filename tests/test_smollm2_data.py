"""The SmolLM2 family's task generator (seeded, disjoint splits, fresh draws) and the premise gate's bookkeeping."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from family_modules import FAMILY, load_family_script


def _load(name):
    return load_family_script(name)


make_data = _load("make_data")
recipe = _load("recipe")


def test_splits_are_seeded_disjoint_and_sized():
    a, b = make_data.splits(), make_data.splits()
    assert a == b  # same seed, same data
    assert {k: len(v) for k, v in a.items()} == {"train": 400, "dev": 300, "test": 600}
    prompts = {k: {r["prompt"] for r in v} for k, v in a.items()}
    assert all(len(prompts[k]) == len(a[k]) for k in a)  # no repeats inside a split
    assert not prompts["train"] & prompts["dev"] and not prompts["train"] & prompts["test"]
    assert not prompts["dev"] & prompts["test"]
    for rows in a.values():  # the three task types in equal shares
        counts = {t: sum(r["type"] == t for r in rows) for t in make_data.TYPES}
        assert max(counts.values()) - min(counts.values()) <= 1
    other = make_data.splits(seed=make_data.SEED + 1)
    assert other["test"] != a["test"]


def test_answers_are_right():
    rows = make_data.splits()["dev"]
    for r in rows:
        p = r["prompt"]
        if r["type"] == "logic":
            words = p.split(": ", 1)[1].split(", ")
            assert r["answer"] == ", ".join(sorted(words)) and len(words) == 4
        elif r["type"] == "math":
            seq = [int(x) for x in p.split(": ", 1)[1].rstrip(", ?").split(", ")]
            assert int(r["answer"]) == seq[-1] + (seq[1] - seq[0])
        else:
            nums = [int(w) for w in p.replace(".", " ").split() if w.isdigit()]
            limit, rate, days = nums
            assert int(r["answer"]) == max(0, days - limit) * rate


def test_shipped_splits_match_the_generator():
    for name, rows in make_data.splits().items():
        shipped = [json.loads(line) for line in open(FAMILY / "data" / f"{name}.jsonl", encoding="utf-8")]
        assert shipped == rows, name


def test_fresh_draw_cli_is_seeded_and_excludes_train(tmp_path):
    out1, out2, out3 = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    for out, seed in ((out1, 7), (out2, 7), (out3, 8)):
        subprocess.run([sys.executable, str(FAMILY / "make_data.py"), "--seed", str(seed), "--n", "90",
                        "--out", str(out)], check=True, capture_output=True)
    assert out1.read_text() == out2.read_text() and out1.read_text() != out3.read_text()
    rows = [json.loads(line) for line in out1.read_text().splitlines()]
    assert len(rows) == 90 and len({r["id"] for r in rows}) == 90
    train = {r["prompt"] for r in make_data.splits()["train"]}
    assert not train & {r["prompt"] for r in rows}
    from epicode_edge.apps.tasks import load_items

    assert len(load_items(out1)) == 90  # the format eval and tune read
    bad = subprocess.run([sys.executable, str(FAMILY / "make_data.py"), "--seed", "1"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--out" in bad.stderr


def test_too_many_items_is_an_error_not_a_hang():
    import random

    with pytest.raises(ValueError, match="cannot draw"):
        make_data.draw(random.Random(0), 10**5, set(), "x")


def _dev(ep2, ep3, mus):
    d = {"epoch1": 0.2, "epoch2": ep2, "epoch3": ep3, "epoch4": 0.9}
    d.update({f"mu={m:g}": a for m, a in zip(recipe.MU_GATE, mus)})
    return d


def test_gate_bookkeeping():
    g = recipe.gate(_dev(0.40, 0.50, [0.41, 0.44, 0.39]))
    assert g["passed"] and g["rises_after_epoch2"] and g["extrapolation_beats_epoch2"]
    assert g["best_mu"] == 0.25 and g["best_mu_accuracy"] == 0.44
    # epoch 3 no better than epoch 2: fails, whatever the extrapolation does
    g = recipe.gate(_dev(0.40, 0.40, [0.45, 0.46, 0.47]))
    assert not g["passed"] and not g["rises_after_epoch2"] and g["extrapolation_beats_epoch2"]
    # rising, but no mu beats epoch 2 (a tie is not a gain)
    g = recipe.gate(_dev(0.40, 0.55, [0.40, 0.38, 0.30]))
    assert not g["passed"] and g["rises_after_epoch2"] and not g["extrapolation_beats_epoch2"]
    assert g["best_mu"] == 0.1  # ties go to the smaller mu
    # numbers that were not measured never pass
    d = _dev(0.4, 0.5, [0.5, 0.5, 0.5])
    del d["mu=0.5"]
    with pytest.raises(ValueError, match="mu=0.5"):
        recipe.gate(d)


def test_learning_rate_schedules():
    f = recipe.lr_factor
    # the warm-up, then constant: the schedule of the shipped run (c2)
    assert [f(s, 5, 100, "constant") for s in (0, 4, 5, 99)] == [0.2, 1.0, 1.0, 1.0]
    # linear: the same warm-up, then down to 0 at the last step, never below
    assert [f(s, 5, 100, "linear") for s in (0, 4, 5)] == [0.2, 1.0, 1.0]
    assert f(55, 5, 105, "linear") == pytest.approx(0.5)
    assert f(100, 5, 100, "linear") == 0.0 and f(120, 5, 100, "linear") == 0.0
    with pytest.raises(ValueError, match="cosine"):
        f(10, 5, 100, "cosine")


def test_exact_grading_matches_eval():
    from epicode_edge.apps import tasks

    for text, answer in (("apple, desk", "apple, desk"), (" 18. ", "18"), ("18 dollars", "18"), ("Apple", "apple")):
        assert recipe.grade(text, answer) == tasks.is_correct(tasks.exact(text), answer, "exact")
