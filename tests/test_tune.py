"""tune: grid validation, the procedure on a tiny pair, resume after an interruption, the final bundle."""

import json

import pytest
from click.testing import CliRunner
from factory import make_pair

from epicode_edge.apps.tune import parse_grid, tune
from epicode_edge.cli import main
from epicode_edge.converters.bundle import open_bundle
from epicode_edge.errors import ContextFullError, ParameterError

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
    # every answer is wrong: mu ties go to the smaller, so lambda is swept at mu = 0.5
    assert scored == {"score mu=1", "score mu=0.5,lambda=0.5", "score mu=0.5,lambda=1"}
    assert not any(s == "convert mu=0.5" for s in stages2)  # the converted bundle was reused
    assert any("only 6 items" in w for w in warned)

    # nothing beat finetuned (all 0%): the bundle is the finetuned model itself, flagged
    assert res.mu == 0.0 and res.lam == 0.0 and not res.beats_finetuned
    assert any(w.startswith("NO GAIN") for w in warned)
    b = open_bundle(out)
    assert b.mu == 0.0 and b.lam == 0.0
    assert b.manifest["tune"]["beats_finetuned"] is False and "verdict" in b.manifest["tune"]
    assert b.manifest["tune"]["dev_items"] == len(PROMPTS)
    assert (tmp_path / "bundle.tune" / "tune_mu.png").is_file()
    assert (tmp_path / "bundle.tune" / "tune_lambda.png").is_file()
    assert "EpiCoDe" in res.table() and "finetuned alone" in res.table()
    assert "Nothing beat the finetuned model" in (tmp_path / "bundle.tune" / "tune.md").read_text()

    # a third run redoes nothing; changed settings start afresh
    stages3 = []
    tune(ft, inf, dev, tmp_path / "again", progress=lambda s, d, t: stages3.append(s),
         work_dir=tmp_path / "bundle.tune", **kw)
    assert not [s for s in stages3 if s.startswith("score")]
    stages4 = []
    tune(ft, inf, dev, tmp_path / "b4", progress=lambda s, d, t: stages4.append(s),
         work_dir=tmp_path / "bundle.tune", **dict(kw, max_tokens=5))
    assert "score finetuned" in stages4


@pytest.fixture(scope="module")
def expert_dev(pair, tmp_path_factory):
    """A dev set whose answers are what the expert at mu = 0.5 says (greedy): there, extrapolation wins."""
    import warnings

    from epicode_edge.converters.convert import convert
    from epicode_edge.runtime import load

    ft, inf, _ = pair
    root = tmp_path_factory.mktemp("expert_dev")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = convert(ft, inf, root / "b", mu=0.5, quant=("F32",))
    rows = []
    with load(b.path) as rt:
        for i, p in enumerate(PROMPTS):
            exp = rt.generate([{"role": "user", "content": p}], max_tokens=6, lam=0.0).text
            fin = rt.compare([{"role": "user", "content": p}], max_tokens=6).text
            rows.append((i, p, exp, fin))
    assert any(e != f for _, _, e, f in rows)  # the expert differs from finetuned somewhere
    dev = root / "dev.jsonl"
    dev.write_text("".join(json.dumps({"id": i, "prompt": p, "answer": e}) + "\n" for i, p, e, _ in rows))
    return dev


def test_mu_that_beats_finetuned_is_chosen_and_lambda_grid_goes_past_1(pair, expert_dev, tmp_path):
    ft, inf, _ = pair
    res = tune(ft, inf, expert_dev, tmp_path / "b", mu_grid="0.05,0.5", lam_grid="0.01,0.5,2,4",
               quant="F32", max_tokens=6, extract="exact", with_inferior=True)
    assert res.points["mu=0.5"].accuracy == 1.0 and res.points["finetuned"].accuracy < 1.0
    assert res.beats_finetuned and res.mu == 0.5 and res.sweep_mu == 0.5
    # the pick at mu 0.5: the best of that mu alone (lambda 0) and its lambdas, ties to the simpler (smaller)
    # lambda; the dev answers are the expert's own, so lambda 0 scores 1.0 and no lambda can beat it; the tiny
    # lambda 0.01 ties with it (the same answers) and must not win the tie
    lam_acc = {p.lam: p.accuracy for p in res.points.values() if p.kind == "lambda"}
    assert lam_acc[0.01] == 1.0 and min(lam_acc.values()) < 1.0
    at_mu = [(0.0, res.points["mu=0.5"].accuracy)] + sorted(lam_acc.items())
    assert res.lam == max(at_mu, key=lambda la: (la[1], -la[0]))[0] == 0.0
    assert res.chosen().accuracy == max(p.accuracy for p in res.points.values() if p.kind in ("mu", "lambda"))
    assert set(lam_acc) == {0.01, 0.5, 2.0, 4.0}
    # the CD-only row got its own lambda from its own dev points (finetuned against inferior)
    cd = {p.lam: p for p in res.points.values() if p.kind == "cd"}
    assert set(cd) == {0.01, 0.5, 2.0, 4.0}
    assert res.cd_lam == max(cd.values(), key=lambda p: (p.accuracy, -p.lam)).lam
    b = open_bundle(res.bundle)
    assert b.mu == 0.5 and b.lam == res.lam and b.manifest["tune"]["beats_finetuned"] is True
    assert b.manifest["tune"]["cd_lambda"] == res.cd_lam
    from epicode_edge.apps.eval import cd_lambda

    assert cd_lambda(b) == (res.cd_lam, "tuned for CD on dev (manifest tune.cd_lambda)")


def test_default_grids_reach_small_mu_and_large_lambda():
    from epicode_edge.apps.tune import DEFAULT_LAM_GRID, DEFAULT_MU_GRID

    assert min(DEFAULT_MU_GRID) <= 0.05 and max(DEFAULT_MU_GRID) <= 0.5
    assert max(DEFAULT_LAM_GRID) > 1


def test_lambda_zero_point_is_the_mu_point(pair, tmp_path):
    """lambda = 0 in the grid adds no work: it is the extrapolated model alone, scored in the mu sweep."""
    ft, inf, dev = pair
    stages = []
    res = tune(ft, inf, dev, tmp_path / "b", mu_grid="0.5", lam_grid="0", quant="F32", max_tokens=6,
               extract="exact", progress=lambda s, d, t: stages.append(s))
    assert res.lam == 0.0
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
            "--with-inferior", "--n-threads", "1"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "NO GAIN" in res.output and "Warning:" in res.output and "CD-only lambda" in res.output
    assert "inferior" in open_bundle(tmp_path / "b").roles
    res = CliRunner().invoke(main, args)  # the output exists now
    assert res.exit_code == 1 and "already exists" in res.output


def test_tune_takes_the_engine_options(pair, tmp_path):
    """tune shares eval's engine options: --n-ctx reaches the engine (a dev prompt longer than that context
    fails there, naming it, where the default context runs it), and --amateur-quant gives the bundles that
    quant too (the amateur loads from it)."""
    ft, inf, _ = pair
    dev = tmp_path / "long.jsonl"  # about 440 tokens: more than 256, within the model's 512 positions
    dev.write_text(json.dumps({"id": 0, "prompt": "The quick brown fox " * 40, "answer": "x"}) + "\n")
    work = tmp_path / "work"
    kw = dict(mu_grid="0.5", lam_grid="1", max_tokens=2, extract="exact", work_dir=work)
    res = tune(ft, inf, dev, tmp_path / "b", quant="F32", amateur_quant="Q8_0", n_threads=1, **kw)
    assert set(open_bundle(res.bundle).quants) == {"F32", "Q8_0"}
    assert json.loads((work / "state.json").read_text())["key"]["amateur_quant"] == "Q8_0"
    with pytest.raises(ContextFullError, match="context of 256"):
        tune(ft, inf, dev, tmp_path / "c", quant="F32", n_ctx=256, **kw)
    args = ["tune", "--finetuned", str(ft), "--inferior", str(inf), "--dev", str(dev), "-o", str(tmp_path / "d"),
            "--work-dir", str(work), "--mu-grid", "0.5", "--lambda-grid", "1", "--quant", "F32",
            "--max-tokens", "2", "--extract", "exact"]
    for extra, env in (["--n-ctx", "256"], {}), ([], {"EPICODE_EDGE_N_CTX": "256"}):
        r = CliRunner().invoke(main, args + extra, env=env)
        last = r.output.strip().splitlines()[-1]  # after tune's warnings (one item; a new state key)
        assert r.exit_code == 1 and last.startswith("Error: ") and "context of 256" in last
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
    r = CliRunner().invoke(main, args + ["--backend", "mlx"])
    assert r.exit_code == 1 and "backend 'mlx'" in r.output
    # the variable is a machine-wide preference (a Mac user's): tune notes it and runs on llama.cpp, where
    # this dev prompt meets the 256-token context
    r = CliRunner().invoke(main, args + ["--n-ctx", "256"], env={"EPICODE_EDGE_BACKEND": "mlx"})
    assert "EPICODE_EDGE_BACKEND=mlx is not applied" in r.output
    assert r.exit_code == 1 and "context of 256" in r.output.strip().splitlines()[-1]


def test_parallel_scores_every_point_as_one_at_a_time(pair, expert_dev, tmp_path):
    """tune --parallel: the dev items decoded together; every grid point's verdicts, and so the choice, as
    one at a time."""
    ft, inf, _ = pair
    kw = dict(mu_grid="0.05,0.5", lam_grid="0.5,2", quant="F32", max_tokens=6, extract="exact", with_inferior=True)
    one = tune(ft, inf, expert_dev, tmp_path / "a", **kw)
    many = tune(ft, inf, expert_dev, tmp_path / "b", parallel=3, **kw)
    assert {k: p.correct for k, p in many.points.items()} == {k: p.correct for k, p in one.points.items()}
    assert (many.mu, many.lam, many.cd_lam) == (one.mu, one.lam, one.cd_lam)
    res = CliRunner().invoke(main, ["tune", "--finetuned", str(ft), "--inferior", str(inf), "--dev",
                                    str(expert_dev), "-o", str(tmp_path / "c"), "--parallel", "0"])
    assert res.exit_code == 2 and "--parallel" in res.output
