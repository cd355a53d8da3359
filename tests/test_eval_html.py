"""eval's report.html: the rows with their intervals and the items where EpiCoDe and finetuned disagree, each
EpiCoDe answer token by token with its changed picks, in one self-contained file (tiny bundle, real engine).
The page itself is driven in a browser in tests/test_web_browser.py."""

from __future__ import annotations

import json
import re

import pytest

from epicode_edge.apps.eval import evaluate
from rt_models import N_THREADS, bundle_dir

PROMPTS = ["What is 17 + 25?", "Name a colour.", "Say hi.", "Count to three."]
KW = dict(max_tokens=10, extract="exact", methods="finetuned,epicode", lam=2.0, alpha=0.2, quant="F32",
          n_threads=N_THREADS)


def report_data(path) -> dict:
    html = path.read_text(encoding="utf-8")
    m = re.search(r'<script id="data" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Answers chosen so that EpiCoDe wins item 0 (its own text is the answer) and loses item 1 (finetuned's
    text is), and the other items are wrong for both."""
    root = tmp_path_factory.mktemp("eval_html")
    bundle = bundle_dir(tmp_path_factory)
    data = root / "dry.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p, "answer": "none"}) + "\n"
                            for i, p in enumerate(PROMPTS)))
    dry = evaluate(bundle, data, **dict(KW, methods="epicode"))  # no finetuned row: no explain
    ep = dry.results["epicode"].texts
    ft = evaluate(bundle, data, **dict(KW, methods="finetuned")).results["finetuned"].texts
    assert ep[0] != ft[0] and ep[1] != ft[1]  # the models differ on these items (else nothing to show)
    answers = [ep[0], ft[1], "none", "none"]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p, "answer": a}) + "\n"
                            for i, (p, a) in enumerate(zip(PROMPTS, answers))))
    report = evaluate(bundle, data, out_dir=root / "out", **KW)
    return dry, report


def test_report_html_shows_the_disagreements(evaluated):
    dry, report = evaluated
    html = (report.out_dir / "report.html").read_text(encoding="utf-8")
    assert "<link" not in html and "<script src" not in html  # the component's CSS and JS are inlined
    assert not re.search(r'(src|href)="(https?:)?//', html) and "EpicodeTokens" in html
    d = report_data(report.out_dir / "report.html")
    assert [r["method"] for r in d["rows"]] == ["finetuned", "epicode"]
    ep_row = d["rows"][1]
    assert (ep_row["k"], ep_row["n"], ep_row["wins"], ep_row["losses"]) == (1, 4, 1, 1)
    assert ep_row["ci"][0] < ep_row["accuracy"] < ep_row["ci"][1]
    assert [(it["id"], it["outcome"]) for it in d["items"]] == [("q0", "won"), ("q1", "lost")]
    ep = report.results["epicode"]
    for i, it in enumerate(d["items"]):
        toks = it["epicode"]["tokens"]
        assert "".join(t["text"] for t in toks) + it["epicode"]["tail"] == ep.texts[i]
        assert all(t["changed"] == (t["token"] != t["own"]) and t["candidates"] for t in toks)
    changed = sum(t["changed"] for it in d["items"] for t in it["epicode"]["tokens"])
    assert changed > 0  # something to highlight on this bundle
    assert set(ep.traces) == {0, 1}  # the per-token data of the disagreeing items only


def test_explain_leaves_the_answers_unchanged(evaluated):
    dry, report = evaluated  # dry: EpiCoDe alone, explain off; report: explain on for EpiCoDe
    assert report.results["epicode"].texts == dry.results["epicode"].texts
    assert report.results["epicode"].changed == dry.results["epicode"].changed
    assert not dry.results["epicode"].traces


def test_report_html_without_the_finetuned_row(tmp_path, tmp_path_factory):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "a", "prompt": "Say hi.", "answer": "x"}) + "\n")
    r = evaluate(bundle_dir(tmp_path_factory), data, out_dir=tmp_path / "o", **dict(KW, methods="epicode"))
    d = report_data(r.out_dir / "report.html")
    assert d["items"] == [] and "need both" in d["note"]


def test_parallel_scores_and_explains_as_one_at_a_time(evaluated, tmp_path, tmp_path_factory):
    """eval --parallel: the items decoded together (completion order), every row's texts, verdicts and changed
    picks as one at a time, and the disagreeing items' per-token data the same (report.html)."""
    _, report = evaluated
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": it.id, "prompt": it.prompt, "answer": it.answer}) + "\n"
                            for it in report.items))
    par = evaluate(bundle_dir(tmp_path_factory), data, out_dir=tmp_path / "o", parallel=3, **KW)
    for m in ("finetuned", "epicode"):
        a, b = report.results[m], par.results[m]
        assert (a.texts, a.correct, a.changed, a.tokens) == (b.texts, b.correct, b.changed, b.tokens), m
    # the same tokens, candidates and verdicts; the log-probs up to the rounding of batched kernels and of the
    # f16 KV cache a prefix was computed into (up to 5.5e-4 seen here)
    assert _close(par.results["epicode"].traces, report.results["epicode"].traces)
    assert _close(report_data(tmp_path / "o" / "report.html")["items"],
                  report_data(report.out_dir / "report.html")["items"])
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["settings"]["parallel"] == 3
    with pytest.raises(Exception, match="parallel must be an integer >= 1, got 0"):
        evaluate(bundle_dir(tmp_path_factory), data, parallel=0, **KW)


def _close(a, b, tol: float = 2e-3) -> bool:
    """Equal JSON-like data, floats within tol."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    return a == b
