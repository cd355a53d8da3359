"""tune: grid validation, the procedure on a tiny pair, resume after an interruption, the final bundle."""

import json

import pytest
from click.testing import CliRunner
from factory import make_pair

from epicode_edge.apps.tune import parse_grid, tune
from epicode_edge.cli import main
from epicode_edge.converters.bundle import open_bundle
from epicode_edge.errors import ParameterError

PROMPTS = ["Question: what is 17 + 25?", "Multiply 3 by 4, then add 5.", "The quick brown fox",
           "Law, math and logic:", "def add(a, b):", "0123456789"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune_family")
    ft, inf = make_pair(root, arch="llama", delta=0.3)
    dev = root / "dev.jsonl"
    dev.write_text("".join(json.dumps({"id": i, "prompt": p, "answer": "x"}) + "\n" for i, p in enumerate(PROMPTS)))
    return ft, inf, dev


def test_parse_grid():
    assert parse_grid("1.0, 0.1,0.5,0.1", "mu") == [0.1, 0.5, 1.0]
    assert parse_grid([0, 0.5], "lambda", allow_zero=True) == [0.0, 0.5]
    for bad in ("0.1,abc", "-0.5", "0", "nan", "inf", "", " , "):
        with pytest.raises(ParameterError):
            parse_grid(bad, "mu")


class Interrupt(Exception):
    pass


def test_resume_skips_finished_points(pair, tmp_path):
    ft, inf, dev = pair
    out = tmp_path / "bundle"
    kw = dict(mu_grid="0.5,1.0", lam_grid="0.5,1.0", quant="F32", max_tokens=6, extract="exact")
    stages = []

    def stop_at_mu1(stage, done, total):
        stages.append(stage)
        if stage == "score mu=1":
            raise Interrupt

    with pytest.raises(Interrupt):
        tune(ft, inf, dev, out, progress=stop_at_mu1, **kw)
    assert "score finetuned" in stages and "score mu=0.5" in stages
    assert not out.exists()  # no bundle under the final name
    state = json.loads((tmp_path / "bundle.tune" / "state.json").read_text())
    assert sorted(state["points"]) == ["finetuned", "mu=0.5"]

    stages2, warned = [], []
    res = tune(ft, inf, dev, out, progress=lambda s, d, t: stages2.append(s), warn=warned.append, **kw)
    assert sorted(res.resumed) == ["finetuned", "mu=0.5"]
    scored = {s for s in stages2 if s.startswith("score")}
    assert scored == {"score mu=1", f"score lambda=0.5", "score lambda=1"}
    assert not any(s == "convert mu=0.5" for s in stages2)  # the converted bundle was reused
    assert any("only 6 items" in w for w in warned)

    # the final bundle carries the chosen mu and lambda
    b = open_bundle(out)
    assert b.mu == res.mu and b.lam == res.lam and res.mu in (0.5, 1.0)
    assert b.manifest["tune"]["dev_items"] == len(PROMPTS)
    assert (tmp_path / "bundle.tune" / "tune_mu.png").is_file()
    assert (tmp_path / "bundle.tune" / "tune_lambda.png").is_file()
    assert "EpiCoDe" in res.table() and "finetuned alone" in res.table()

    # a third run redoes nothing; changed settings start afresh
    stages3 = []
    tune(ft, inf, dev, tmp_path / "again", progress=lambda s, d, t: stages3.append(s),
         work_dir=tmp_path / "bundle.tune", **kw)
    assert not [s for s in stages3 if s.startswith("score")]
    stages4 = []
    tune(ft, inf, dev, tmp_path / "b4", progress=lambda s, d, t: stages4.append(s),
         work_dir=tmp_path / "bundle.tune", **dict(kw, max_tokens=5))
    assert "score finetuned" in stages4


def test_lambda_zero_point_is_the_mu_point(pair, tmp_path):
    """lambda = 0 in the grid adds no work: it is the extrapolated model alone, scored in the mu sweep."""
    ft, inf, dev = pair
    stages = []
    res = tune(ft, inf, dev, tmp_path / "b", mu_grid="0.5", lam_grid="0", quant="F32", max_tokens=6,
               extract="exact", progress=lambda s, d, t: stages.append(s))
    assert res.lam == 0.0 and res.mu == 0.5
    assert not [s for s in stages if "lambda" in s]


def test_cli_tune_bad_grid(pair, tmp_path):
    ft, inf, dev = pair
    res = CliRunner().invoke(main, ["tune", "--finetuned", str(ft), "--inferior", str(inf), "--dev", str(dev),
                                    "-o", str(tmp_path / "b"), "--mu-grid", "0.1,-1"])
    assert res.exit_code == 1 and "mu grid" in res.output
    assert not (tmp_path / "b").exists()


def test_cli_tune_runs(pair, tmp_path):
    ft, inf, dev = pair
    args = ["tune", "--finetuned", str(ft), "--inferior", str(inf), "--dev", str(dev), "-o", str(tmp_path / "b"),
            "--mu-grid", "0.5", "--lambda-grid", "0.5", "--quant", "F32", "--max-tokens", "4", "--extract", "exact",
            "--with-inferior"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "Chose mu = 0.5" in res.output and "Warning:" in res.output
    assert "inferior" in open_bundle(tmp_path / "b").roles
    res = CliRunner().invoke(main, args)  # the output exists now
    assert res.exit_code == 1 and "already exists" in res.output
