"""End-to-end eval on tiny models: the four rows, identities (mu = 0, lambda = 0), scoring, files, CLI."""

import json
import warnings

import pytest
from click.testing import CliRunner
from factory import make_pair

from epicode_edge.apps.eval import evaluate
from epicode_edge.cli import main
from epicode_edge.converters.convert import convert

PROMPTS = ["Question: what is 17 + 25?", "Multiply 3 by 4, then add 5.", "The quick brown fox",
           "Law, math and logic:", "def add(a, b):"]


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_family")
    ft, inf = make_pair(root, arch="llama", delta=0.3)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p, "answer": "42"}) + "\n"
                            for i, p in enumerate(PROMPTS)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = dict(to=("gguf",), quant=("F32",), lam=0.5, alpha=0.1)
        b = convert(ft, inf, root / "bundle", mu=0.5, with_inferior=True, **kw)
        b0 = convert(ft, inf, root / "bundle_mu0", mu=0.0, **kw)
    return {"root": root, "ft": ft, "inf": inf, "data": data, "bundle": b.path, "bundle_mu0": b0.path}


@pytest.fixture(scope="session")
def report(family, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_out")
    return evaluate(family["bundle"], family["data"], out_dir=out, max_tokens=12, extract="exact")


def test_four_rows_same_items(report):
    assert list(report.results) == ["finetuned", "extrapolation", "cd", "epicode"]
    for r in report.results.values():
        assert r.skipped is None and r.n == len(PROMPTS) and len(r.texts) == len(PROMPTS)
        assert all(isinstance(t, str) for t in r.texts)
    rows = report.rows()
    assert rows[0].delta is None and all(r.delta is not None for r in rows[1:])
    # the methods really differ on this pair (otherwise the identities below would prove nothing)
    assert report.results["epicode"].texts != report.results["finetuned"].texts
    assert report.results["epicode"].changed > 0


def test_files_written(report):
    out = report.out_dir
    recs = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == [f"q{i}" for i in range(len(PROMPTS))]
    assert recs[0]["epicode"]["text"] == report.results["epicode"].texts[0]
    md = (out / "report.md").read_text()
    assert "EpiCoDe (expert vs amateur)" in md and "accuracy.png" in md
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text())["settings"]["n_items"] == len(PROMPTS)


def test_lambda_zero_epicode_is_extrapolation(family, report):
    r0 = evaluate(family["bundle"], family["data"], max_tokens=12, extract="exact", lam=0.0,
                  methods="extrapolation,epicode")
    assert r0.results["epicode"].texts == r0.results["extrapolation"].texts
    assert r0.results["extrapolation"].texts == report.results["extrapolation"].texts


def test_mu_zero_extrapolation_is_finetuned(family):
    r = evaluate(family["bundle_mu0"], family["data"], max_tokens=12, extract="exact",
                 methods="finetuned,extrapolation,cd")
    assert r.results["extrapolation"].texts == r.results["finetuned"].texts
    assert r.results["cd"].skipped and "with-inferior" in r.results["cd"].skipped


def test_scoring_counts_right_answers(family, report, tmp_path):
    """Gold answers set to the finetuned outputs for the first 3 items: finetuned scores exactly 3/5."""
    texts = report.results["finetuned"].texts
    data = tmp_path / "gold.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p, "answer": (texts[i] if i < 3 else "zzz") or "x"})
                            + "\n" for i, p in enumerate(PROMPTS)))
    r = evaluate(family["bundle"], data, max_tokens=12, extract="exact", methods="finetuned")
    assert r.results["finetuned"].correct == [bool(texts[i].strip()) for i in range(3)] + [False, False]


def test_cli_eval_prints_table_and_warns(family, tmp_path):
    res = CliRunner().invoke(main, ["eval", str(family["bundle"]), str(family["data"]), "-o", str(tmp_path / "o"),
                                    "--max-tokens", "8", "--extract", r"regex:(\d{9})", "--limit", "3"])
    assert res.exit_code == 0, res.output
    assert "CD only (finetuned vs inferior)" in res.output and "McNemar" in res.output
    assert "matched none of the 3 finetuned outputs" in res.output
    assert "only 3 items" in res.output
    assert (tmp_path / "o" / "eval.jsonl").is_file()


def test_cli_eval_parallel_gives_the_same_table(family, report, tmp_path):
    """--parallel 3: all four rows (finetuned alone, CD against the inferior, ...) decoded together give the
    same answers as one at a time."""
    res = CliRunner().invoke(main, ["eval", str(family["bundle"]), str(family["data"]), "-o", str(tmp_path / "o"),
                                    "--max-tokens", "12", "--extract", "exact", "--parallel", "3"])
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in (tmp_path / "o" / "eval.jsonl").read_text().splitlines()]
    for m, r in report.results.items():
        assert [x[m]["text"] for x in recs] == r.texts, m


@pytest.mark.parametrize("line,msg", [
    ('{"id": "x", "prompt": "hi"}', "line 2: no 'answer' field"),
    ('{"id": "x", "answer": "1"}', "line 2: no 'prompt' or 'messages' field"),
])
def test_cli_eval_bad_data(family, tmp_path, line, msg):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "ok", "answer": "1"}) + "\n" + line + "\n")
    res = CliRunner().invoke(main, ["eval", str(family["bundle"]), str(data), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and msg in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_eval_empty_data_and_bad_extract(family, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    res = CliRunner().invoke(main, ["eval", str(family["bundle"]), str(empty)])
    assert res.exit_code == 1 and "no items" in res.output
    res = CliRunner().invoke(main, ["eval", str(family["bundle"]), str(family["data"]), "--extract", "regex:("])
    assert res.exit_code == 1 and "invalid" in res.output


def test_sampled_runs_and_paired_t_test(family, tmp_path):
    """--runs 3: every method sampled with seeds 0..2 (temperature), the same seed giving the same outputs;
    the runs table pairs each method's runs with finetuned's and reports a t-test."""
    kw = dict(max_tokens=8, extract="exact", methods="finetuned,epicode", runs=3, temp=1.5)
    r = evaluate(family["bundle"], family["data"], out_dir=tmp_path / "o", **kw)
    assert [len(r.runs[m]) for m in ("finetuned", "epicode")] == [3, 3]
    texts = [x.texts for x in r.runs["epicode"]]
    assert texts[0] != texts[1] or texts[1] != texts[2]  # the seeds really sample
    again = evaluate(family["bundle"], family["data"], **dict(kw, runs=2))
    assert [x.texts for x in again.runs["epicode"]] == texts[:2]  # seeded
    # greedy rows are still there, unchanged by the runs
    assert r.results["finetuned"].texts == evaluate(family["bundle"], family["data"], max_tokens=8, extract="exact",
                                                   methods="finetuned").results["finetuned"].texts
    from epicode_edge.apps.eval import runs_rows

    rows = {x.method: x for x in runs_rows(r.runs)}
    assert rows["finetuned"].delta is None and len(rows["epicode"].accuracies) == 3
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["settings"]["runs"] == 3 and [x["method"] for x in summary["runs"]] == ["finetuned", "epicode"]
    assert "sampled runs" in (tmp_path / "o" / "report.md").read_text()


def test_runs_table_statistics():
    from epicode_edge.apps.eval import MethodResult, runs_rows

    def res(name, ks):  # accuracies k/10 per run
        return [MethodResult(name, correct=[True] * k + [False] * (10 - k)) for k in ks]

    rows = runs_rows({"finetuned": res("finetuned", [5, 6, 5, 6]), "epicode": res("epicode", [7, 7, 8, 7])})
    ep = rows[1]
    assert abs(ep.delta - 0.175) < 1e-12 and abs(ep.mean - 0.725) < 1e-12
    # by hand: the run-by-run differences 0.2, 0.1, 0.3, 0.1; t = mean / (sd / sqrt(n)) on n - 1 = 3 degrees of
    # freedom; p two-sided from t(3)'s closed-form CDF, 1 - 2/pi (atan(x) + x / (1 + x^2)) with x = t/sqrt(3)
    import math
    import statistics

    d = [0.2, 0.1, 0.3, 0.1]
    t = statistics.mean(d) / (statistics.stdev(d) / math.sqrt(len(d)))
    x = t / math.sqrt(3)
    p = 1 - 2 / math.pi * (math.atan(x) + x / (1 + x * x))
    assert abs(ep.t - t) < 1e-9 and abs(t - 3.6556) < 1e-4
    assert abs(ep.p_value - p) < 1e-6 and 0.03 < p < 0.04


def test_paired_t_against_known_values():
    from epicode_edge.apps.tasks import paired_t, t_two_sided

    assert abs(t_two_sided(2.262157, 9) - 0.05) < 1e-4  # the tabulated 97.5% quantile of t(9)
    assert abs(t_two_sided(12.7062, 1) - 0.05) < 1e-4
    assert abs(t_two_sided(0.0, 5) - 1.0) < 1e-12
    mean, t, p = paired_t([1, 2, 3, 4], [2, 4, 3, 6])  # d = 1, 2, 0, 2: mean 1.25, sd 0.957
    assert abs(mean - 1.25) < 1e-12 and abs(t - 2.6112) < 1e-3 and abs(p - 0.0796) < 1e-3
    assert paired_t([0.5, 0.5], [0.5, 0.5]) == (0.0, 0.0, 1.0)
    with pytest.raises(ValueError):
        paired_t([0.5], [0.6])


def test_cd_row_uses_its_own_lambda(family, tmp_path):
    from epicode_edge.apps.eval import cd_lambda
    from epicode_edge.converters.bundle import open_bundle

    b = open_bundle(family["bundle"])
    assert cd_lambda(b) == (0.5, "the bundle's lambda (no CD lambda tuned on dev)")
    r = evaluate(family["bundle"], family["data"], max_tokens=8, extract="exact", methods="cd", cd_lam=0.0)
    plain = evaluate(family["bundle"], family["data"], max_tokens=8, extract="exact", methods="finetuned")
    assert r.results["cd"].texts == plain.results["finetuned"].texts  # CD at lambda 0 is finetuned alone
    assert r.settings["cd_lam"] == 0.0 and r.settings["cd_lam_from"] == "given"


def test_eval_takes_the_engine_options(family, tmp_path):
    """eval shares the engine options of generate/chat/batch: --amateur-quant gives the contrast rows a cheaper
    amateur and leaves the finetuned row at the main quant."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = convert(family["ft"], family["inf"], tmp_path / "two", mu=0.5, to=("gguf",), quant=("F32", "Q8_0"),
                    with_inferior=True)
    kw = dict(max_tokens=12, extract="exact", methods="finetuned,epicode")
    same = evaluate(b.path, family["data"], quant="F32", **kw)
    mixed = evaluate(b.path, family["data"], quant="F32", amateur_quant="Q8_0", **kw)
    assert mixed.settings["amateur_quant"] == "Q8_0" and same.settings["amateur_quant"] is None
    assert mixed.results["finetuned"].texts == same.results["finetuned"].texts
    r = CliRunner().invoke(main, ["eval", str(b.path), str(family["data"]), "--quant", "F32", "--amateur-quant",
                                  "Q4_0", "-o", str(tmp_path / "o"), "--max-tokens", "4", "--extract", "exact"])
    assert r.exit_code != 0 and "Q4_0" in r.output and len(r.output.strip().splitlines()) == 1
