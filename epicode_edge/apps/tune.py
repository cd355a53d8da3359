"""`tune`: the paper's procedure on a dev set (DESIGN.md section 1, step 3).

    result = tune("ft/", "ep1/", "dev.jsonl", "bundle/", mu_grid=(0.1, 0.2, 0.5, 1.0),
                  lam_grid=(0.1, 0.3, 0.5, 1.0))

1. Score the finetuned model alone on dev (the baseline, mu = 0).
2. For each mu: convert finetuned/inferior into a bundle in the work folder; score the expert alone
   (lambda = 0). Keep the best mu (ties: the smaller).
3. With that mu frozen, score EpiCoDe for each lambda. Keep the best lambda (ties: the smaller). A 0 in the
   lambda grid lets the expert alone (the mu point, no extra work) compete too.
4. Write the final bundle: the best mu's bundle with the chosen lambda as its default.

Resumable: every finished grid point is stored in WORK/state.json (keyed by the inputs' content and the
settings), and converted bundles are kept in WORK/; a rerun skips what is done. Charts of dev accuracy
against mu and against lambda, and a Markdown table, go to WORK/.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import InputError, ParameterError
from . import tasks

STATE = "state.json"
DEFAULT_MU_GRID = (0.1, 0.2, 0.5, 1.0)
DEFAULT_LAM_GRID = (0.1, 0.3, 0.5, 1.0)

# progress(stage, done, total): stage is e.g. "convert mu=0.5", "score mu=0.5", "score lambda=0.3"
ProgressFn = Callable[[str, int, int], None]
WarnFn = Callable[[str], None]


def parse_grid(value, name: str, allow_zero: bool = False) -> list[float]:
    """'0.1,0.2' or a sequence -> sorted unique floats; ParameterError on anything invalid."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for p in parts:
        if isinstance(p, str):
            p = p.strip()
            if not p:
                continue
        try:
            x = float(p)
        except (TypeError, ValueError):
            raise ParameterError(f"{name} grid: {p!r} is not a number") from None
        if not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
            raise ParameterError(f"{name} grid: {p!r} must be a finite number {'>= 0' if allow_zero else '> 0'}")
        out.append(x)
    if not out:
        raise ParameterError(f"{name} grid is empty")
    return sorted(set(out))


def point_key(kind: str, value: float | None = None) -> str:
    return kind if value is None else f"{kind}={value:g}"


@dataclass
class Point:
    """One scored grid point."""

    key: str
    kind: str  # "finetuned" | "mu" | "lambda"
    mu: float
    lam: float
    correct: list[bool]
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else 0.0


@dataclass
class TuneResult:
    bundle: Path
    mu: float
    lam: float
    alpha: float
    points: dict[str, Point]
    work_dir: Path
    n_items: int
    warnings: list[str] = field(default_factory=list)
    charts: list[Path] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)  # keys found done in the state file

    def rows(self) -> list[tuple[str, Point]]:
        order = {"finetuned": 0, "mu": 1, "lambda": 2}
        return sorted(((k, p) for k, p in self.points.items()),
                      key=lambda kp: (order[kp[1].kind], kp[1].mu if kp[1].kind == "mu" else kp[1].lam))

    def table(self, markdown: bool = False) -> str:
        base = self.points.get("finetuned")
        head = ["stage", "mu", "lambda", "dev accuracy", "95% CI", "vs finetuned", "McNemar p", "pick"]
        body = []
        for key, p in self.rows():
            k, n = sum(p.correct), len(p.correct)
            lo, hi = tasks.wilson(k, n)
            delta = p_val = ""
            if base is not None and p is not base:
                wins_lost = tasks.discordant(base.correct, p.correct)
                delta = f"{100 * (p.accuracy - base.accuracy):+.1f} pts"
                p_val = f"{tasks.mcnemar_exact(*wins_lost):.3g}"
            stage = {"finetuned": "finetuned alone", "mu": "extrapolated alone", "lambda": "EpiCoDe"}[p.kind]
            chosen = "<- chosen" if p.kind == "lambda" and p.lam == self.lam and p.mu == self.mu or (
                p.kind == "mu" and p.mu == self.mu and self.lam == 0) else ""
            body.append([stage, f"{p.mu:g}", f"{p.lam:g}", f"{100 * p.accuracy:.1f}% ({k}/{n})",
                         f"{100 * lo:.1f}-{100 * hi:.1f}", delta, p_val, chosen])
        if markdown:
            return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                             + ["| " + " | ".join(b) + " |" for b in body])
        widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
        fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


# ---------------------------------------------------------------------------------------------- state


def file_digest(path: Path) -> str:
    """sha256 over a file, or over a folder's files (names and contents, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class State:
    """WORK/state.json: the settings key and the finished points; saved atomically after each point."""

    def __init__(self, work: Path, key: dict):
        self.path = work / STATE
        self.key = key
        self.points: dict[str, dict] = {}
        self.stale = False
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except ValueError:
                data = {}
            if data.get("key") == key:
                self.points = data.get("points", {})
            else:
                self.stale = True

    def get(self, key: str) -> dict | None:
        return self.points.get(key)

    def put(self, key: str, value: dict) -> None:
        self.points[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(STATE + ".tmp")
        tmp.write_text(json.dumps({"key": self.key, "points": self.points}))
        tmp.replace(self.path)


# ---------------------------------------------------------------------------------------------- charts


def tune_charts(result: TuneResult) -> list[Path]:
    """WORK/tune_mu.png and WORK/tune_lambda.png: dev accuracy with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = result.points
    base = pts.get("finetuned")
    out = []
    series = {
        "mu": ([base] if base else []) + sorted((p for p in pts.values() if p.kind == "mu"), key=lambda p: p.mu),
        "lambda": [p for p in pts.values() if p.kind == "mu" and p.mu == result.mu]
        + sorted((p for p in pts.values() if p.kind == "lambda"), key=lambda p: p.lam),
    }
    for name, ps in series.items():
        if not ps:
            continue
        xs = [p.mu if name == "mu" else p.lam for p in ps]
        acc = [100 * p.accuracy for p in ps]
        ci = [tasks.wilson(sum(p.correct), len(p.correct)) for p in ps]
        err = [[max(0.0, a - 100 * lo) for a, (lo, _) in zip(acc, ci)], [max(0.0, 100 * hi - a) for a, (_, hi) in zip(acc, ci)]]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.errorbar(xs, acc, yerr=err, marker="o", capsize=4)
        if base is not None:
            ax.axhline(100 * base.accuracy, color="gray", ls="--", lw=1, label="finetuned alone")
            ax.legend(fontsize=8)
        if name == "mu":
            ax.set_xlabel("mu (extrapolated model alone; mu = 0 is finetuned)")
        else:
            ax.set_xlabel(f"lambda (EpiCoDe at mu = {result.mu:g}; lambda = 0 is the expert alone)")
        ax.set_ylabel(f"dev accuracy (%), n = {result.n_items}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = result.work_dir / f"tune_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


# ---------------------------------------------------------------------------------------------- the procedure


def tune(finetuned, inferior, dev, out, *, mu_grid=DEFAULT_MU_GRID, lam_grid=DEFAULT_LAM_GRID,
         alpha: float = 0.1, quant: str = "Q8_0", with_inferior: bool = False, work_dir=None,
         extract: str = "last-number", max_tokens: int = 128, limit: int | None = None, backend: str = "llama.cpp",
         n_threads: int | None = None, force: bool = False, progress: ProgressFn | None = None,
         warn: WarnFn | None = None) -> TuneResult:
    """Pick mu (extrapolated model alone on dev), then lambda (EpiCoDe at that mu); write the bundle `out`
    with that mu and lambda as its default. Resumes from WORK/state.json (default work folder: OUT.tune)."""
    from ..converters.bundle import check_output
    from ..decoding.contrastive import check_alpha

    mus = parse_grid(mu_grid, "mu")
    lams = parse_grid(lam_grid, "lambda", allow_zero=True)
    alpha = check_alpha(alpha)
    tasks.make_extractor(extract)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ParameterError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    out = check_output(out, force)  # refuse an existing output before hours of work
    items = tasks.load_items(dev, limit=limit)
    warnings_ = []
    small = tasks.too_small_warning(len(items), f"dev set {dev}")
    if small:
        warnings_.append(small)
        if warn:
            warn(small)
    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".tune")
    work.mkdir(parents=True, exist_ok=True)
    key = {"finetuned": file_digest(Path(finetuned)), "inferior": file_digest(Path(inferior)),
           "dev": file_digest(Path(dev)), "limit": limit, "extract": extract, "max_tokens": max_tokens,
           "alpha": alpha, "quant": quant, "backend": backend, "with_inferior": with_inferior}
    state = State(work, key)
    if state.stale and warn:
        warn(f"{state.path}: made with other inputs or settings; starting afresh")
    run = _Runner(finetuned, inferior, items, work, state, quant=quant, with_inferior=with_inferior,
                  extract=extract, max_tokens=max_tokens, backend=backend, n_threads=n_threads,
                  progress=progress)
    resumed = [k for k in state.points]

    # 1-2. the baseline and the mu sweep (the extrapolated model alone)
    run.point("finetuned", mus[0], 0.0)
    for mu in mus:
        run.point("mu", mu, 0.0)
    mu_pts = [run.points[point_key("mu", mu)] for mu in mus]
    best_mu = max(mu_pts, key=lambda p: (p.accuracy, -p.mu)).mu
    # 3. the lambda sweep at that mu (lambda = 0 is the mu point itself)
    for lam in lams:
        if lam > 0:
            run.point("lambda", best_mu, lam)
    cands = [run.points[point_key("mu", best_mu)]] * (0.0 in lams) + [
        run.points[point_key("lambda", lam)] for lam in lams if lam > 0]
    best = max(cands, key=lambda p: (p.accuracy, -p.lam))
    result = TuneResult(out, best_mu, best.lam, alpha, dict(run.points), work, len(items), warnings_,
                        resumed=resumed)
    result.warnings += _tune_warnings(result)
    if warn:
        for w in result.warnings[len(warnings_):]:
            warn(w)
    # 4. the final bundle
    write_final(run.bundle_dir(best_mu), out, lam=best.lam, alpha=alpha, force=force, tune_info=_tune_info(result))
    result.charts = tune_charts(result)
    (work / "tune.md").write_text(f"# tune\n\nmu = {best_mu:g}, lambda = {best.lam:g}, alpha = {alpha:g}, "
                                  f"{len(items)} dev items from `{dev}`\n\n{result.table(markdown=True)}\n\n"
                                  + "".join(f"![{c.stem}]({c.name})\n" for c in result.charts))
    return result


class _Runner:
    """Converts the mu bundles (kept in WORK/mu-X) and scores grid points, storing each in the state."""

    def __init__(self, finetuned, inferior, items, work, state, *, quant, with_inferior, extract, max_tokens,
                 backend, n_threads, progress):
        self.finetuned, self.inferior, self.items, self.work, self.state = finetuned, inferior, items, work, state
        self.quant, self.with_inferior, self.extract, self.max_tokens = quant, with_inferior, extract, max_tokens
        self.backend, self.n_threads, self.progress = backend, n_threads, progress
        self.points: dict[str, Point] = {}

    def bundle_dir(self, mu: float) -> Path:
        return self.work / f"mu-{mu:g}"

    def bundle(self, mu: float):
        """The bundle for mu: reused when complete and made from the same inputs, else (re)converted."""
        from ..converters.bundle import open_bundle
        from ..converters.convert import convert
        from ..errors import BundleError

        path = self.bundle_dir(mu)
        try:
            b = open_bundle(path)
            if b.mu == mu and self.quant.upper() in (q.upper() for q in b.quants) and (
                    not self.with_inferior or "inferior" in b.roles):
                return b
        except BundleError:
            pass
        stage = f"convert mu={mu:g}"

        def prog(p):
            if self.progress and p.tensors_total:
                self.progress(stage, p.tensors_done, p.tensors_total)

        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return convert(self.finetuned, self.inferior, path, mu=mu, to=("gguf",), quant=(self.quant,),
                           with_inferior=self.with_inferior, force=True, progress=prog)

    def point(self, kind: str, mu: float, lam: float) -> Point:
        from ..runtime import load
        from .eval import runner, score

        key = point_key(kind) if kind == "finetuned" else point_key(kind, mu if kind == "mu" else lam)
        done = self.state.get(key)
        if done is not None and len(done["correct"]) == len(self.items):
            p = Point(key, kind, done["mu"], done["lam"], [bool(c) for c in done["correct"]], done["seconds"])
            self.points[key] = p
            return p
        b = self.bundle(mu)
        rt = load(b.path, backend=self.backend, quant=self.quant, n_threads=self.n_threads)
        try:
            method = "finetuned" if kind == "finetuned" else "extrapolation" if kind == "mu" else "epicode"
            settings = {"lam": lam} if kind != "finetuned" else {}
            if kind == "lambda":
                settings["alpha"] = self.state.key["alpha"]
            stage = f"score {key}"
            prog = (lambda _m, d, t: self.progress(stage, d, t)) if self.progress else None
            r = score(runner(rt, method, settings, self.max_tokens), self.items, self.extract, key, prog)
        finally:
            rt.close()
        p = Point(key, kind, 0.0 if kind == "finetuned" else mu, lam, r.correct, round(r.seconds, 2))
        self.state.put(key, {"mu": p.mu, "lam": p.lam, "correct": [int(c) for c in p.correct],
                             "accuracy": p.accuracy, "seconds": p.seconds})
        self.points[key] = p
        return p


def _tune_warnings(result: TuneResult) -> list[str]:
    """Say when the dev set cannot tell the chosen settings from finetuned, or when nothing beat it."""
    base = result.points.get("finetuned")
    chosen = next((p for p in result.points.values()
                   if (p.kind == "lambda" and p.mu == result.mu and p.lam == result.lam)
                   or (p.kind == "mu" and p.mu == result.mu and result.lam == 0)), None)
    if base is None or chosen is None:
        return []
    wins_losses = tasks.discordant(base.correct, chosen.correct)
    p = tasks.mcnemar_exact(*wins_losses)
    if chosen.accuracy <= base.accuracy:
        return [f"no setting beat the finetuned model on dev ({100 * base.accuracy:.1f}% vs best "
                f"{100 * chosen.accuracy:.1f}%)"]
    if p >= 0.05:
        return [f"the chosen setting beats finetuned on dev by {100 * (chosen.accuracy - base.accuracy):.1f} points, "
                f"but the dev set cannot tell them apart (McNemar p = {p:.2g}, {wins_losses[1]} wins / "
                f"{wins_losses[0]} losses): use more dev items"]
    return []


def _tune_info(result: TuneResult) -> dict:
    return {"mu_grid": sorted(p.mu for p in result.points.values() if p.kind == "mu"),
            "lambda_grid": sorted(p.lam for p in result.points.values() if p.kind == "lambda"),
            "dev_items": result.n_items,
            "dev_accuracy": {k: round(p.accuracy, 4) for k, p in result.points.items()}}


def write_final(src: Path, out: Path, *, lam: float, alpha: float, force: bool, tune_info: dict) -> Path:
    """Copy the chosen mu's bundle to `out` with lambda/alpha as its defaults (atomic: temp name, rename)."""
    from ..converters.bundle import MANIFEST, open_bundle

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-tune")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    mpath = tmp / MANIFEST
    manifest = json.loads(mpath.read_text())
    manifest["defaults"] = {"lambda": lam, "alpha": alpha}
    manifest["tune"] = tune_info
    mpath.write_text(json.dumps(manifest, indent=2) + "\n")
    open_bundle(tmp)  # still valid
    if out.exists():
        if not force:
            shutil.rmtree(tmp)
            raise InputError(f"{out}: already exists (use --force to replace it)")
        old = out.with_name(f".{out.name}.old-{int(time.time())}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return out
