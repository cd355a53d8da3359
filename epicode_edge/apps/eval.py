"""`evaluate`: the paper's four methods side by side on the same items, with intervals and paired tests.

    report = evaluate("bundle/", "test.jsonl", out_dir="eval-out", extract="last-number")
    print(report.table())

Methods (rows), each greedy:
    finetuned      the amateur alone (the vanilla finetuned model)
    extrapolation  the expert alone (lambda = 0)
    cd             contrastive decoding without extrapolation: finetuned as expert, inferior as amateur
                   (needs a bundle made with `convert --with-inferior`; else left out with the reason)
    epicode        the expert against the amateur with the bundle's lambda and alpha

The CD-only row uses its own lambda: the one `tune` chose for it on dev (the manifest's tune.cd_lambda),
else the bundle's lambda (the report says which).

runs > 1 adds N sampled runs of every method (temperature `temp`, seeds 0..N-1, the same seed for every
method of a run) and a paired t-test across runs against finetuned, as the paper compares its 10 runs,
beside the greedy table's one-run McNemar test.

Writes OUT/eval.jsonl (one line per item: every method's output, extracted answer, correctness),
OUT/report.md (settings, table, chart, disagreements) with OUT/accuracy.png, OUT/summary.json, and
OUT/report.html: the table with its intervals and the items where EpiCoDe and finetuned disagree, each
EpiCoDe answer with its changed picks highlighted and every token's candidates (apps/web/report.html; one
self-contained file). For those items the EpiCoDe row decodes with explain on (decoding/explain.py: the same
picks; the amateur's whole output layer is read), and keeps the per-token data of the disagreeing items only.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from ..engine_options import EngineOptions
from ..errors import MissingExtraError, ParameterError, require
from . import tasks
from .tasks import Item

METHODS = ("finetuned", "extrapolation", "cd", "epicode")
LABELS = {
    "finetuned": "finetuned (amateur alone)",
    "extrapolation": "extrapolation only (expert, lambda=0)",
    "cd": "CD only (finetuned vs inferior)",
    "epicode": "EpiCoDe (expert vs amateur)",
}

# progress(method, done, total)
ProgressFn = Callable[[str, int, int], None]
WarnFn = Callable[[str], None]


@dataclass
class MethodResult:
    name: str
    settings: dict = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)
    extracted: list[str | None] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    tokens: int = 0
    changed: int = 0  # picks where contrastive decoding overrode the expert's own choice
    seconds: float = 0.0
    skipped: str | None = None  # why the method was left out
    traces: dict[int, dict] = field(default_factory=dict)  # item index -> {"tokens": [...], "tail": str}

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def k(self) -> int:
        return sum(self.correct)

    @property
    def accuracy(self) -> float:
        return self.k / self.n if self.n else 0.0


@dataclass
class Row:
    """One line of the table: a method's accuracy, interval and paired comparison with finetuned."""

    method: str
    label: str
    k: int
    n: int
    accuracy: float
    ci: tuple[float, float]
    delta: float | None = None  # accuracy - finetuned accuracy
    wins: int = 0  # items this method got right and finetuned got wrong
    losses: int = 0
    p_value: float | None = None  # exact McNemar against finetuned
    boot_ci: tuple[float, float] | None = None  # paired bootstrap 95% interval of delta
    skipped: str | None = None


def compare_rows(results: dict[str, MethodResult], baseline: str = "finetuned") -> list[Row]:
    """Rows for the table: accuracy + Wilson interval, and against `baseline`: delta, wins/losses,
    exact McNemar p-value and a paired bootstrap interval of the delta."""
    base = results.get(baseline)
    rows = []
    for name, r in results.items():
        label = LABELS.get(name, name)
        if r.skipped:
            rows.append(Row(name, label, 0, 0, 0.0, (0.0, 0.0), skipped=r.skipped))
            continue
        row = Row(name, label, r.k, r.n, r.accuracy, tasks.wilson(r.k, r.n))
        if base is not None and not base.skipped and name != baseline and base.n == r.n and r.n:
            row.losses, row.wins = tasks.discordant(base.correct, r.correct)
            row.delta = r.accuracy - base.accuracy
            row.p_value = tasks.mcnemar_exact(row.wins, row.losses)
            _, lo, hi = tasks.paired_bootstrap(base.correct, r.correct)
            row.boot_ci = (lo, hi)
        rows.append(row)
    return rows


def format_table(rows: list[Row], markdown: bool = False) -> str:
    """The table as aligned text (terminal) or Markdown."""
    head = ["method", "accuracy", "95% CI", "vs finetuned", "wins/losses", "McNemar p"]
    body = []
    for r in rows:
        if r.skipped:
            body.append([r.label, "-", "-", "-", "-", f"left out: {r.skipped}"])
            continue
        body.append([
            r.label, f"{100 * r.accuracy:.1f}% ({r.k}/{r.n})", f"{100 * r.ci[0]:.1f}-{100 * r.ci[1]:.1f}",
            "" if r.delta is None else f"{100 * r.delta:+.1f} pts",
            "" if r.delta is None else f"{r.wins}/{r.losses}",
            "" if r.p_value is None else f"{r.p_value:.3g}",
        ])
    return tasks.render_table(head, body, markdown)


@dataclass
class RunsRow:
    """One method over N sampled runs: accuracy per run, and the paired t-test against finetuned."""

    method: str
    label: str
    accuracies: list[float]
    delta: float | None = None  # mean over runs of (accuracy - finetuned's accuracy in the same run)
    t: float | None = None
    p_value: float | None = None

    @property
    def mean(self) -> float:
        return sum(self.accuracies) / len(self.accuracies)

    @property
    def sd(self) -> float:
        n, m = len(self.accuracies), self.mean
        return math.sqrt(sum((a - m) ** 2 for a in self.accuracies) / (n - 1)) if n > 1 else 0.0


def runs_rows(runs: dict[str, list[MethodResult]], baseline: str = "finetuned") -> list[RunsRow]:
    """Rows of the runs table: mean and sd of accuracy over runs, paired t-test against `baseline`."""
    base = runs.get(baseline)
    out = []
    for name, rs in runs.items():
        row = RunsRow(name, LABELS.get(name, name), [r.accuracy for r in rs])
        if base is not None and name != baseline and len(base) == len(rs) >= 2:
            row.delta, row.t, row.p_value = tasks.paired_t([r.accuracy for r in base], row.accuracies)
        out.append(row)
    return out


def format_runs_table(rows: list[RunsRow], markdown: bool = False) -> str:
    head = ["method", "mean accuracy", "sd", "runs", "vs finetuned (mean)", "paired t", "t-test p"]
    body = [[r.label, f"{100 * r.mean:.1f}%", f"{100 * r.sd:.1f}", " ".join(f"{100 * a:.1f}" for a in r.accuracies),
             "" if r.delta is None else f"{100 * r.delta:+.1f} pts", "" if r.t is None else f"{r.t:.2f}",
             "" if r.p_value is None else f"{r.p_value:.3g}"] for r in rows]
    return tasks.render_table(head, body, markdown)


@dataclass
class EvalReport:
    items: list[Item]
    results: dict[str, MethodResult]
    settings: dict
    out_dir: Path | None = None
    warnings: list[str] = field(default_factory=list)
    runs: dict[str, list[MethodResult]] = field(default_factory=dict)  # sampled runs per method (runs > 1)

    def rows(self) -> list[Row]:
        return compare_rows(self.results)

    def table(self, markdown: bool = False) -> str:
        return format_table(self.rows(), markdown)

    def runs_table(self, markdown: bool = False) -> str:
        return format_runs_table(runs_rows(self.runs), markdown) if self.runs else ""


# ---------------------------------------------------------------------------------------------- scoring


def score(answers: Callable[[list[Item]], Iterable[tuple[int, tuple]]], items: list[Item], extract: str, name: str,
          progress: ProgressFn | None = None, keep: Callable[[int, bool], bool] | None = None) -> MethodResult:
    """Run one method over the items: answers(items) yields (index, (text, tokens, changed picks[, trace])) for
    every item, in any order (runner: one at a time, or decoded together); trace a callable giving the
    answer's per-token data; keep(i, correct) says which items' traces to keep."""
    extractor = tasks.make_extractor(extract)
    r = MethodResult(name)
    n = len(items)
    r.texts, r.extracted, r.correct = [""] * n, [None] * n, [False] * n
    t0 = time.perf_counter()
    for done, (i, (text, n_tokens, changed, *trace)) in enumerate(answers(items), 1):
        got = extractor(text)
        r.texts[i], r.extracted[i] = text, got
        r.correct[i] = tasks.is_correct(got, items[i].answer, extract)
        if trace and keep is not None and keep(i, r.correct[i]):
            r.traces[i] = trace[0]()
        r.tokens += n_tokens
        r.changed += changed
        if progress:
            progress(name, done, n)
    r.seconds = time.perf_counter() - t0
    return r


def extraction_warnings(results: dict[str, MethodResult], extract: str) -> list[str]:
    """One warning per method whose outputs the extractor found no answer in (with the count)."""
    out = []
    for name, r in results.items():
        missing = sum(1 for e in r.extracted if e is None)
        if r.skipped or not missing:
            continue
        if missing == r.n:
            out.append(f"--extract {extract} matched none of the {r.n} {name} outputs: check the pattern")
        else:
            out.append(f"--extract {extract} found no answer in {missing} of {r.n} {name} outputs "
                       f"(counted as wrong)")
    return out


def check_parallel(parallel) -> int:
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise ParameterError(f"parallel must be an integer >= 1, got {parallel!r}")
    return parallel


def check_methods(methods) -> list[str]:
    methods = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ParameterError(f"methods {', '.join(bad) or '(none)'} not among {', '.join(METHODS)}")
    return [m for m in METHODS if m in methods]  # table order


# ---------------------------------------------------------------------------------------------- running


DEFAULT_TEMP = 0.7  # sampled runs only (runs > 1); a common sampling temperature, not tuned


def cd_lambda(b) -> tuple[float, str]:
    """The CD-only row's lambda: what tune chose for it on dev, else the bundle's (EpiCoDe's) lambda."""
    tuned = (b.manifest.get("tune") or {}).get("cd_lambda")
    if isinstance(tuned, (int, float)) and not isinstance(tuned, bool):
        return float(tuned), "tuned for CD on dev (manifest tune.cd_lambda)"
    return b.lam, "the bundle's lambda (no CD lambda tuned on dev)"


def evaluate(bundle, data, *, out_dir=None, max_tokens: int = 128, extract: str = "last-number",
             limit: int | None = None, methods=METHODS, lam: float | None = None, alpha: float | None = None,
             cd_lam: float | None = None, runs: int = 1, temp: float = DEFAULT_TEMP,
             engine: EngineOptions | None = None, overlap: bool | None = None, constraint=None,
             parallel: int = 1, progress: ProgressFn | None = None, **engine_options) -> EvalReport:
    """Score the methods on the same items (greedy) and, with out_dir, write the JSONL, report and chart.

    lam / alpha default to the bundle's; cd_lam (the CD-only row's lambda) to tune's choice for it, else the
    bundle's lambda. Methods the bundle cannot run (cd without an inferior model) are kept as rows with the
    reason. runs > 1 adds that many sampled runs (temp, seeds 0..runs-1) and a paired t-test across them.
    Warnings (extraction misses, too few items) are in report.warnings. engine: how the bundle is loaded, a
    runtime.EngineOptions or its fields as keywords (quant="Q4_0", n_threads=4), as load() takes it;
    overlap: the decoding setting of the contrastive rows (None: auto). constraint: structured output for
    every row (a decoding/constraint.py Constraint or a response_format object; score it with extract
    "json:FIELD"). parallel: items decoded together per method (Runtime.stream_many; 1: one at a time).
    """
    from ..converters.bundle import open_bundle
    from ..decoding.contrastive import check_alpha, check_lam

    methods = check_methods(methods)
    tasks.make_extractor(extract)  # validate before any work
    from ..runtime import Settings

    engine = EngineOptions.of(engine, **engine_options)
    Settings().updated(max_tokens=max_tokens)  # the one max_tokens rule (an integer >= 0)
    cons = {} if constraint is None else {"constraint": Settings().updated(constraint=constraint).constraint}
    if limit is not None and limit < 1:
        raise ParameterError(f"limit must be >= 1, got {limit!r}")
    if not isinstance(runs, int) or isinstance(runs, bool) or runs < 1:
        raise ParameterError(f"runs must be an integer >= 1, got {runs!r}")
    check_parallel(parallel)
    if runs > 1 and (not isinstance(temp, (int, float)) or not math.isfinite(temp) or temp <= 0):
        raise ParameterError(f"temp must be a number > 0 for sampled runs, got {temp!r}")
    b = open_bundle(bundle)
    lam = check_lam(b.lam if lam is None else lam)
    alpha = check_alpha(b.alpha if alpha is None else alpha)
    cd_lam, cd_lam_from = (check_lam(cd_lam), "given") if cd_lam is not None else cd_lambda(b)
    items = tasks.load_items(data, limit=limit)
    t0 = time.perf_counter()
    ov = {} if overlap is None else {"overlap": bool(overlap)}
    settings_of = {"finetuned": {**cons}, "extrapolation": {"lam": 0.0, **cons},
                   "epicode": {"lam": lam, "alpha": alpha, **ov, **cons}, "cd": {"lam": cd_lam, "alpha": alpha, **ov, **cons}}
    results: dict[str, MethodResult] = {}
    sampled: dict[str, list[MethodResult]] = {}
    used_backend = engine.backend
    plans = {}  # method -> (roles, engine) it runs on
    for m in methods:
        if m == "cd" and "inferior" not in b.roles:
            results[m] = MethodResult(m, skipped="the bundle has no inferior model (make it with convert --with-inferior)")
            continue
        roles = {"cd": ("amateur", "inferior"), "finetuned": ("amateur", "amateur")}.get(m, ("expert", "amateur"))
        if m == "finetuned" and runs == 1:
            roles = ("expert", "amateur")  # greedy: the amateur alone through compare(), no second copy
        # the finetuned row is the finetuned model at the main quant, whatever quant the contrast model has
        plans[m] = (roles, replace(engine, amateur_quant=None) if m == "finetuned" else engine)
    # rows that run on the same models one after another, so one loaded runtime (and its caches) serves them
    order = sorted(plans, key=lambda m: list(plans.values()).index(plans[m]))
    rt, loaded = None, None
    try:
        for m in order:
            if plans[m] != loaded:
                if rt is not None:
                    rt.close()
                    rt = None
                rt, loaded = _load(b, plans[m][1], roles=plans[m][0]), plans[m]
            ft = results.get("finetuned")
            keep = None  # EpiCoDe's answers where finetuned got the other verdict: their tokens, for report.html
            if m == "epicode" and ft is not None and not ft.skipped:
                def keep(i, correct, ft=ft):
                    return correct != ft.correct[i]
            results[m] = score(runner(rt, m, settings_of[m], max_tokens, explain=keep is not None, parallel=parallel),
                               items, extract, m, progress, keep)
            results[m].settings = dict(settings_of[m])
            for seed in range(runs if runs > 1 else 0):
                s = dict(settings_of[m], temp=float(temp), seed=seed)
                if m == "finetuned":
                    s["lam"] = 0.0  # the finetuned model as expert, alone
                r = score(runner(rt, "sampled", s, max_tokens, parallel=parallel), items, extract,
                          f"{m} run {seed + 1}/{runs}", progress)
                r.name, r.settings = m, s
                sampled.setdefault(m, []).append(r)
            used_backend = rt.backend
    finally:
        if rt is not None:
            rt.close()
    results = {m: results[m] for m in methods}
    settings = {"bundle": str(b.path), "data": str(data), "mu": b.mu, "lam": lam, "alpha": alpha,
                "cd_lam": cd_lam, "cd_lam_from": cd_lam_from, "max_tokens": max_tokens, "extract": extract,
                "backend": used_backend, "quant": engine.quant, "amateur_quant": engine.amateur_quant,
                "n_items": len(items), "runs": runs, "parallel": parallel,
                "constraint": None if constraint is None else cons["constraint"].as_response_format(),
                "temp": temp if runs > 1 else None, "seconds": round(time.perf_counter() - t0, 2)}
    report = EvalReport(items, results, settings, runs=sampled)
    report.warnings = extraction_warnings(results, extract)
    small = tasks.too_small_warning(len(items), "the data set")
    if small:
        report.warnings.append(small)
    if out_dir is not None:
        write_outputs(report, out_dir)
    return report


def _load(b, engine, *, roles):
    from ..runtime import load

    return load(b.path, engine, roles=roles)


def runner(rt, method: str, settings: dict, max_tokens: int, explain: bool = False, parallel: int = 1):
    """answers(items) -> (index, (text, completion tokens, changed picks)) for one method on a Runtime, one item
    at a time, or with parallel > 1 decoded together (Runtime.stream_many: the same picks up to the float
    rounding of batched kernels) in completion order. explain: and a fourth element, a callable giving the
    answer's tokens as decoding/explain.py's JSON ({"tokens", "tail"})."""
    if parallel > 1:
        return _batched_answers(rt, method, settings, max_tokens, explain, parallel)
    if method == "finetuned":
        def run(item: Item):
            r = rt.compare(item.chat(), max_tokens=max_tokens, **settings)
            return r.text, r.completion_tokens, 0
    elif explain:
        from ..runtime import Collector

        def run(item: Item):
            got, steps = Collector(), []
            for ev in rt.stream(item.chat(), max_tokens=max_tokens, explain=True, **settings):
                got.add(ev)
                if not ev.final:
                    steps.append((ev.text, ev.explain))
            r = got.result()
            return r.text, r.completion_tokens, r.changed_tokens, _trace(rt, steps, got.last.text)
    else:
        def run(item: Item):
            r = rt.generate(item.chat(), max_tokens=max_tokens, **settings)
            return r.text, r.completion_tokens, r.changed_tokens
    return lambda items: ((i, run(item)) for i, item in enumerate(items))


def _trace(rt, steps: list, tail: str):
    """The answer's tokens as decoding/explain.py's JSON, made when asked for; tail: the text the stream held
    back until its end (a possible stop string)."""
    from ..decoding.explain import explain_json

    return lambda: {"tokens": [explain_json(exp, rt.expert, text) for text, exp in steps], "tail": tail}


def _batched_answers(rt, method: str, settings: dict, max_tokens: int, explain: bool, parallel: int):
    """runner's answers, `parallel` requests at a time: the finetuned row runs the amateur alone (greedy, as
    compare()); the first failed request raises, as one at a time does."""
    finetuned = method == "finetuned"
    s = rt.settings(max_tokens=max_tokens, explain=explain and not finetuned, **settings)

    def answers(items):
        steps: dict[int, list] = {}
        on_event = (lambda i, ev: steps.setdefault(i, []).append((ev.text, ev.explain))) if s.explain else None
        requests = ((i, rt.encode(item.chat()), s) for i, item in enumerate(items))
        for i, r in rt.stream_many(requests, parallel=min(parallel, max(len(items), 1)), on_event=on_event,
                                   finetuned=finetuned, overlap=s.overlap):
            if isinstance(r, BaseException):
                raise r
            if not s.explain:
                yield i, (r.text, r.completion_tokens, 0 if finetuned else r.changed_tokens)
                continue
            mine = steps.pop(i, [])
            shown = "".join(text for text, _ in mine)
            yield i, (r.text, r.completion_tokens, r.changed_tokens, _trace(rt, mine, r.text[len(shown):]))
    return answers


# ---------------------------------------------------------------------------------------------- writing


def item_records(report: EvalReport):
    """One dict per item: id, prompt, answer and every method's text / extracted answer / correctness."""
    for i, item in enumerate(report.items):
        rec = {"id": item.id, "prompt": item.text, "answer": item.answer}
        for name, r in report.results.items():
            if not r.skipped:
                rec[name] = {"text": r.texts[i], "extracted": r.extracted[i], "correct": r.correct[i]}
        yield rec


def write_outputs(report: EvalReport, out_dir) -> dict[str, Path]:
    """OUT/eval.jsonl, OUT/summary.json, OUT/accuracy.png and OUT/report.md; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"jsonl": out / "eval.jsonl", "summary": out / "summary.json", "chart": out / "accuracy.png",
             "report": out / "report.md", "html": out / "report.html"}
    _atomic_lines(paths["jsonl"], (json.dumps(rec, ensure_ascii=False) for rec in item_records(report)))
    rows = report.rows()
    summary = {"settings": report.settings, "warnings": report.warnings,
               "rows": [{k: v for k, v in r.__dict__.items()} for r in rows]}
    if report.runs:
        summary["runs"] = [dict(r.__dict__, mean=r.mean, sd=r.sd) for r in runs_rows(report.runs)]
    _atomic_lines(paths["summary"], [json.dumps(summary, indent=2)])
    try:
        accuracy_chart(rows, paths["chart"], title=f"{report.settings.get('data', '')} "
                                                   f"(n={len(report.items)})")
    except MissingExtraError as e:  # the scores are the result; the chart is optional (the `charts` extra)
        report.warnings.append(f"no chart: {e}")
    _atomic_lines(paths["report"], [markdown_report(report, rows, paths["chart"].name)])
    _atomic_lines(paths["html"], [html_report(report, rows)])
    report.out_dir = out
    return paths


def _atomic_lines(path: Path, lines) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    tmp.replace(path)


def accuracy_chart(rows: list[Row], path: Path, title: str = "") -> Path:
    """Horizontal bars of accuracy with 95% Wilson intervals (matplotlib, Agg backend)."""
    require("matplotlib", f"the chart {path.name}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.skipped][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.2))
    acc = [100 * r.accuracy for r in rows]
    err = [[max(0.0, 100 * (r.accuracy - r.ci[0])) for r in rows], [max(0.0, 100 * (r.ci[1] - r.accuracy)) for r in rows]]
    colors = ["#888888" if r.method == "finetuned" else "#2b7bba" if r.method != "epicode" else "#d9480f"
              for r in rows]
    ax.barh([r.label for r in rows], acc, xerr=err, color=colors, capsize=4)
    for y, (a, r) in enumerate(zip(acc, rows)):
        ax.text(100 * r.ci[1] + 1, y - 0.1, f"{a:.1f}%", fontsize=9)
    ax.set_xlim(0, 112)
    ax.set_xlabel("accuracy (%), bars: 95% Wilson interval")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_report(report: EvalReport, rows: list[Row], chart_name: str, n_examples: int = 5) -> str:
    s = report.settings
    lines = [
        "# EpiCoDe evaluation", "",
        f"- bundle: `{s.get('bundle')}` (mu = {s.get('mu')}, lambda = {s.get('lam')}, alpha = {s.get('alpha')})",
        f"- data: `{s.get('data')}`, {len(report.items)} items; extraction: `{s.get('extract')}`; "
        f"max_tokens = {s.get('max_tokens')}; greedy decoding; backend: {s.get('backend')}",
        f"- time: {s.get('seconds', 0):.0f} s", "",
        format_table(rows, markdown=True), "",
        "Intervals: 95% Wilson. Against finetuned: wins/losses are the items only this method / only finetuned "
        "got right; p is the exact McNemar test on them (two-sided).", "",
        f"![accuracy]({chart_name})", "",
    ]
    if s.get("cd_lam") is not None and "cd" in report.results and not report.results["cd"].skipped:
        lines[3:3] = [f"- CD only: lambda = {s['cd_lam']:g} ({s.get('cd_lam_from')})"]
    if report.runs:
        lines += [f"## {s.get('runs')} sampled runs (temperature {s.get('temp')}, seeds 0..{s.get('runs', 1) - 1})", "",
                  report.runs_table(markdown=True), "",
                  "Paired t-test across runs against finetuned (the same seed pairs the runs), two-sided.", ""]
    if report.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in report.warnings] + [""]
    lines += _disagreements(report, n_examples)
    return "\n".join(lines)


def _disagreements(report: EvalReport, n: int) -> list[str]:
    ft, ep = report.results.get("finetuned"), report.results.get("epicode")
    if not ft or not ep or ft.skipped or ep.skipped:
        return []
    idx = [i for i in range(len(report.items)) if ft.correct[i] != ep.correct[i]][:n]
    if not idx:
        return []
    out = ["## Items where finetuned and EpiCoDe disagree (first few)", ""]
    for i in idx:
        it = report.items[i]
        out += [f"**{it.id}** {it.text} (answer: {it.answer})", "",
                f"- finetuned {'✓' if ft.correct[i] else '✗'}: `{_one_line(ft.texts[i])}`",
                f"- EpiCoDe {'✓' if ep.correct[i] else '✗'}: `{_one_line(ep.texts[i])}`", ""]
    return out


def _one_line(text: str, limit: int = 200) -> str:
    t = " ".join(text.split()).replace("`", "'")
    return t if len(t) <= limit else t[: limit - 3] + "..."


HTML_ITEMS = 200  # the most disagreeing items report.html shows (the first ones)


def html_report(report: EvalReport, rows: list[Row], limit: int = HTML_ITEMS) -> str:
    """report.html: the rows with their intervals, and the items where EpiCoDe and finetuned disagree (won:
    EpiCoDe right and finetuned wrong; lost: the other way), each EpiCoDe answer token by token with its
    changed picks (apps/web/report.html, apps/web/tokens.js)."""
    from .web import page

    s = report.settings
    settings = [("bundle", s.get("bundle")), ("mu", s.get("mu")), ("lambda", s.get("lam")), ("alpha", s.get("alpha")),
                ("data", f"{s.get('data')} ({len(report.items)} items)"), ("extraction", s.get("extract")),
                ("max_tokens", s.get("max_tokens")), ("decoding", "greedy"), ("backend", s.get("backend")),
                ("time", f"{s.get('seconds', 0):.0f} s")]
    data = {"settings": settings, "items": [], "n_disagree": 0, "note": None,
            "rows": [{"method": r.method, "label": r.label, "k": r.k, "n": r.n, "accuracy": r.accuracy,
                      "ci": list(r.ci), "delta": r.delta, "wins": r.wins, "losses": r.losses,
                      "p_value": r.p_value, "boot_ci": list(r.boot_ci) if r.boot_ci else None,
                      "skipped": r.skipped} for r in rows]}
    ft, ep = report.results.get("finetuned"), report.results.get("epicode")
    if not ft or not ep or ft.skipped or ep.skipped:
        data["note"] = "The disagreements need both the finetuned and the EpiCoDe rows."
        return page("report.html", data)
    idx = [i for i in range(len(report.items)) if ft.correct[i] != ep.correct[i]]
    data["n_disagree"] = len(idx)
    for i in idx[:limit]:
        it = report.items[i]
        trace = ep.traces.get(i) or {}
        data["items"].append({
            "id": it.id, "prompt": it.text, "answer": it.answer, "outcome": "won" if ep.correct[i] else "lost",
            "finetuned": {"text": ft.texts[i], "extracted": ft.extracted[i], "correct": ft.correct[i]},
            "epicode": {"text": ep.texts[i], "extracted": ep.extracted[i], "correct": ep.correct[i],
                        "tokens": trace.get("tokens"), "tail": trace.get("tail", "")}})
    return page("report.html", data)
