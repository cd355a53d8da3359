"""`tune`: the paper's procedure on a dev set (docs/design.md#the-method, step 3).

    result = tune("ft/", "ep1/", "dev.jsonl", "bundle/")                  # full checkpoints
    result = tune("ep2-adapter/", "ep1-adapter/", "dev.jsonl", "bundle/", base="base.gguf")   # LoRA

1. Score the finetuned model alone on dev (the baseline, mu = 0).
2. For each mu: convert finetuned/inferior into a bundle in the work folder; score the expert alone
   (lambda = 0). mu = 0 (the finetuned model) competes: the best of {0} and the grid is kept (ties: the
   smaller mu).
3. Score EpiCoDe for each lambda at the best positive mu (when mu = 0 won, at the best positive mu still:
   contrastive decoding can gain where extrapolation alone does not). The pick is the best of finetuned,
   that mu alone (lambda = 0) and its lambda points (ties: the simpler, finetuned first, then smaller lambda).
4. With cd=True (the bundle has the inferior model): the CD-only row's own lambda, scored on dev as
   finetuned against inferior for each lambda of the grid; stored in the manifest as tune.cd_lambda, where
   `eval` reads it.
5. Write the final bundle: the chosen mu's bundle with the chosen lambda as its default. When nothing beat
   the finetuned model on dev, the bundle is made at mu = 0 and lambda = 0 (the finetuned model itself), the
   manifest says tune.beats_finetuned = false, and the result carries a loud warning.

Resumable: every finished grid point is stored in WORK/state.json (keyed by the inputs' content and the
settings), and converted bundles are kept in WORK/; a rerun skips what is done. Charts of dev accuracy
against mu and against lambda, and a Markdown table, go to WORK/.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..defaults import DEFAULT_ALPHA
from ..engine_options import EngineOptions
from ..errors import MissingExtraError, ParameterError, require
from . import tasks

STATE = "state.json"
# mu: the paper has mu << 1; on SmolLM2-135M (models/smollm2/README.md#what-was-tried) mu = 1 overshot and
# the gains sat at mu <= 0.5, so the grid is dense at small values (down to 0.025); mu = 0 (finetuned) always
# competes.
DEFAULT_MU_GRID = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5)
# lambda: the paper's error analysis puts the best lambda near 1/(k-1) for an amateur whose error is k times
# the expert's, which is large when the two are close (k near 1): the grid reaches well past 1.
DEFAULT_LAM_GRID = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)

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
    kind: str  # "finetuned" | "mu" | "lambda" | "cd" (finetuned against inferior, its own lambda)
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
    cd_lam: float | None = None  # the CD-only row's own lambda (cd=True)
    sweep_mu: float | None = None  # the mu the lambda sweep ran at

    @property
    def beats_finetuned(self) -> bool:
        """Whether the chosen setting is better than the finetuned model on dev (False: the bundle is
        the finetuned model itself, mu = 0 and lambda = 0)."""
        return self.mu > 0

    def chosen(self) -> Point | None:
        if self.mu == 0:
            return self.points.get("finetuned")
        return next((p for p in self.points.values() if (p.kind == "lambda" and p.mu == self.mu and p.lam == self.lam)
                     or (p.kind == "mu" and p.mu == self.mu and self.lam == 0)), None)

    def rows(self) -> list[tuple[str, Point]]:
        order = {"finetuned": 0, "mu": 1, "lambda": 2, "cd": 3}
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
            stage = {"finetuned": "finetuned alone", "mu": "extrapolated alone", "lambda": "EpiCoDe",
                     "cd": "CD only (ft vs inferior)"}[p.kind]
            chosen = "<- chosen" if p is self.chosen() else "<- CD's lambda" if (
                p.kind == "cd" and p.lam == self.cd_lam) else ""
            body.append([stage, f"{p.mu:g}", f"{p.lam:g}", f"{100 * p.accuracy:.1f}% ({k}/{n})",
                         f"{100 * lo:.1f}-{100 * hi:.1f}", delta, p_val, chosen])
        return tasks.render_table(head, body, markdown)


# ---------------------------------------------------------------------------------------------- state


def file_digest(path: Path) -> str:
    """sha256 over a file, or over a folder's files (names and contents, sorted)."""
    from ..hashing import sha256_tree

    return sha256_tree(path)


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
    require("matplotlib", "tune's charts")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = result.points
    base = pts.get("finetuned")
    out = []
    series = {
        "mu": ([base] if base else []) + sorted((p for p in pts.values() if p.kind == "mu"), key=lambda p: p.mu),
        "lambda": [p for p in pts.values() if p.kind == "mu" and p.mu == result.sweep_mu]
        + sorted((p for p in pts.values() if p.kind == "lambda"), key=lambda p: p.lam),
        "cd": ([base] if base else []) + sorted((p for p in pts.values() if p.kind == "cd"), key=lambda p: p.lam),
    }
    for name, ps in series.items():
        if len(ps) < 2:
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
        elif name == "lambda":
            ax.set_xlabel(f"lambda (EpiCoDe at mu = {result.sweep_mu:g}; lambda = 0 is the expert alone)")
        else:
            ax.set_xlabel("lambda (CD only: finetuned against inferior; lambda = 0 is finetuned)")
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
         alpha: float = DEFAULT_ALPHA, with_inferior: bool = False, base=None, cd: bool | None = None,
         work_dir=None, extract: str = "last-number", max_tokens: int = 128, limit: int | None = None,
         force: bool = False, engine: EngineOptions | None = None, overlap: bool | None = None,
         parallel: int = 1, progress: ProgressFn | None = None, warn: WarnFn | None = None,
         **engine_options) -> TuneResult:
    """Pick mu (extrapolated model alone on dev, mu = 0 competing), then lambda (EpiCoDe at that mu), and,
    with cd, the CD-only row's own lambda; write the bundle `out` with that mu and lambda as its default.
    base: the base model when finetuned/inferior are PEFT LoRA adapters (a shared-base bundle, which always
    holds the inferior model). cd defaults to whether the bundles hold the inferior model.
    engine: how the bundles are loaded, a runtime.EngineOptions or its fields as keywords, as eval takes it;
    its quant (default Q8_0) is also the quant the bundles are converted at; with amateur_quant they are
    converted at both quants. Its backend is llama.cpp (auto means it: the bundles are GGUF).
    overlap: the decoding setting of the contrastive points (None: auto). parallel: dev items decoded
    together (as eval's; a point scored before with another value is reused: the picks differ only by the
    rounding of batched kernels). Resumes from WORK/state.json (default work folder: OUT.tune). alpha = 0.1 is the paper's."""
    from ..converters.bundle import check_output
    from ..decoding.contrastive import check_alpha
    from .eval import check_parallel

    engine = EngineOptions.of(engine, **engine_options)
    check_parallel(parallel)
    if engine.backend not in ("auto", "llama.cpp"):
        raise ParameterError(f"tune converts GGUF bundles and scores them on llama.cpp: backend {engine.backend!r} "
                             "is not supported (use auto or llama.cpp)")
    # the bundles tune converts are GGUF only
    engine = replace(engine, backend="llama.cpp", quant=engine.quant or "Q8_0")
    quant = engine.quant
    mus = parse_grid(mu_grid, "mu", allow_zero=True)
    mus = [m for m in mus if m > 0]  # mu = 0 is the finetuned baseline, scored anyway
    if not mus:
        raise ParameterError("mu grid has no value > 0")
    lams = [lam for lam in parse_grid(lam_grid, "lambda", allow_zero=True) if lam > 0]  # 0 = the mu point
    alpha = check_alpha(alpha)
    with_inferior = bool(with_inferior or base is not None)
    cd = with_inferior if cd is None else bool(cd)
    if cd and not with_inferior:
        raise ParameterError("tuning the CD-only lambda needs the inferior model in the bundle (--with-inferior)")
    tasks.make_extractor(extract)
    from ..runtime import Settings

    Settings().updated(max_tokens=max_tokens)  # the one max_tokens rule (an integer >= 0)
    out = check_output(out, force)  # refuse an existing output before hours of work
    items = tasks.load_items(dev, limit=limit)
    warnings_ = []
    small = tasks.too_small_warning(len(items), f"dev set {dev}")
    if small:
        warnings_.append(small)
        if warn:
            warn(small)
    from ..converters.hub import resolve_all

    finetuned, inferior, base = resolve_all(finetuned, inferior, base)  # Hub ids: the cached snapshot paths
    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".tune")
    work.mkdir(parents=True, exist_ok=True)
    key = {"finetuned": file_digest(Path(finetuned)), "inferior": file_digest(Path(inferior)),
           "base": file_digest(Path(base)) if base is not None else None,
           "dev": file_digest(Path(dev)), "limit": limit, "extract": extract, "max_tokens": max_tokens,
           "alpha": alpha, "quant": quant, "backend": engine.backend, "with_inferior": with_inferior,
           **_result_options(engine)}
    state = State(work, key)
    if state.stale and warn:
        warn(f"{state.path}: made with other inputs or settings; starting afresh")
    run = _Runner(finetuned, inferior, items, work, state, with_inferior=with_inferior, base=base,
                  extract=extract, max_tokens=max_tokens, engine=engine, overlap=overlap, parallel=parallel,
                  progress=progress)
    resumed = [k for k in state.points]

    # 1-2. the baseline and the mu sweep (the extrapolated model alone); mu = 0 competes
    base_pt = run.point("finetuned", mus[0], 0.0)
    mu_pts = [run.point("mu", mu, 0.0) for mu in mus]
    best_pos = max(mu_pts, key=lambda p: (p.accuracy, -p.mu))
    # 3. the lambda sweep at the best positive mu; the pick among finetuned, that mu alone and its lambdas
    lam_pts = [run.point("lambda", best_pos.mu, lam) for lam in lams]
    cands = [base_pt, best_pos] + lam_pts  # in order of simplicity: ties go to the earlier
    best = max(cands, key=lambda p: (p.accuracy, -cands.index(p)))
    chosen_mu, chosen_lam = (0.0, 0.0) if best is base_pt else (best.mu, best.lam)
    # 4. the CD-only row's own lambda (finetuned against inferior; no mu involved)
    cd_lam = None
    if cd:
        cd_pts = [run.point("cd", best_pos.mu, lam) for lam in lams]
        cd_lam = max(cd_pts, key=lambda p: (p.accuracy, -p.lam)).lam
    result = TuneResult(out, chosen_mu, chosen_lam, alpha, dict(run.points), work, len(items), warnings_,
                        resumed=resumed, cd_lam=cd_lam, sweep_mu=best_pos.mu)
    new = _tune_warnings(result)
    result.warnings = warnings_ + new
    if warn:
        for w in new:
            warn(w)
    # 5. the final bundle (mu = 0: the finetuned model itself, flagged)
    src = run.bundle_dir(chosen_mu) if chosen_mu > 0 else run.bundle(0.0).path
    write_final(src, out, lam=chosen_lam, alpha=alpha, force=force, tune_info=_tune_info(result))
    try:
        result.charts = tune_charts(result)
    except MissingExtraError as e:  # the bundle is the result; the charts are optional (the `charts` extra)
        result.charts = []
        warn(f"no charts: {e}")
    verdict = ("" if result.beats_finetuned else "**Nothing beat the finetuned model on dev: the bundle is the "
               "finetuned model itself (mu = 0, lambda = 0).**\n\n")
    (work / "tune.md").write_text(f"# tune\n\n{verdict}mu = {chosen_mu:g}, lambda = {chosen_lam:g}, alpha = {alpha:g}"
                                  + (f", CD-only lambda = {cd_lam:g}" if cd_lam is not None else "")
                                  + f", {len(items)} dev items from `{dev}`\n\n{result.table(markdown=True)}\n\n"
                                  + "".join(f"![{c.stem}]({c.name})\n" for c in result.charts))
    return result


def _result_options(engine) -> dict:
    """The engine options that can change the scores, for the state key: only those set away from load()'s
    defaults, so that the same run from the CLI and from Python shares its finished points."""
    changed = engine.changed()
    return {k: changed[k] for k in ("amateur_quant", "kv_type", "n_ctx") if k in changed}


class _Runner:
    """Converts the mu bundles (kept in WORK/mu-X) and scores grid points, storing each in the state."""

    def __init__(self, finetuned, inferior, items, work, state, *, with_inferior, base, extract, max_tokens,
                 engine, overlap, progress, parallel: int = 1):
        self.finetuned, self.inferior, self.items, self.work, self.state = finetuned, inferior, items, work, state
        self.with_inferior, self.extract, self.max_tokens = with_inferior, extract, max_tokens
        self.base = base
        self.engine, self.overlap, self.progress, self.parallel = engine, overlap, progress, parallel
        # the bundles hold the amateur's quant too (load() takes it from the bundle)
        self.quants = tuple(dict.fromkeys(q for q in (engine.quant, engine.amateur_quant) if q))
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
            if b.mu == mu and {q.upper() for q in self.quants} <= {q.upper() for q in b.quants} and (
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
            from ..runtime import check_gguf_runs  # each written GGUF loads and gives finite logits

            if self.base is not None:
                from ..converters.lora import convert_lora

                return convert_lora(self.base, self.finetuned, self.inferior, path, mu=mu, quant=self.quants,
                                    force=True, progress=prog, check_model=check_gguf_runs)
            return convert(self.finetuned, self.inferior, path, mu=mu, to=("gguf",), quant=self.quants,
                           with_inferior=self.with_inferior, force=True, progress=prog, check_model=check_gguf_runs)

    def point(self, kind: str, mu: float, lam: float) -> Point:
        from ..runtime import load
        from .eval import runner, score

        key = point_key(kind) if kind == "finetuned" else point_key(kind, mu if kind == "mu" else lam)
        if kind == "lambda":
            key = f"mu={mu:g},lambda={lam:g}"  # a lambda point belongs to its mu
        done = self.state.get(key)
        if done is not None and len(done["correct"]) == len(self.items):
            p = Point(key, kind, done["mu"], done["lam"], [bool(c) for c in done["correct"]], done["seconds"])
            self.points[key] = p
            return p
        b = self.bundle(mu)
        roles = ("amateur", "inferior") if kind == "cd" else ("expert", "amateur")
        # the finetuned model at the main quant, as eval's finetuned row
        engine = replace(self.engine, amateur_quant=None) if kind == "finetuned" else self.engine
        rt = load(b.path, engine, roles=roles)
        try:
            method = {"finetuned": "finetuned", "mu": "extrapolation"}.get(kind, "epicode")
            settings = {"lam": lam} if kind != "finetuned" else {}
            if kind in ("lambda", "cd"):
                settings["alpha"] = self.state.key["alpha"]
                if self.overlap is not None:
                    settings["overlap"] = bool(self.overlap)
            stage = f"score {key}"
            prog = (lambda _m, d, t: self.progress(stage, d, t)) if self.progress else None
            r = score(runner(rt, method, settings, self.max_tokens, parallel=self.parallel), self.items, self.extract,
                      key, prog)
        finally:
            rt.close()
        p = Point(key, kind, 0.0 if kind in ("finetuned", "cd") else mu, lam, r.correct, round(r.seconds, 2))
        self.state.put(key, {"mu": p.mu, "lam": p.lam, "correct": [int(c) for c in p.correct],
                             "accuracy": p.accuracy, "seconds": p.seconds})
        self.points[key] = p
        return p


def _tune_warnings(result: TuneResult) -> list[str]:
    """Say loudly when nothing beat the finetuned model, and when the dev set cannot tell the pick from it."""
    base = result.points.get("finetuned")
    if base is None:
        return []
    if not result.beats_finetuned:
        best = max((p for p in result.points.values() if p.kind in ("mu", "lambda")), key=lambda p: p.accuracy,
                   default=None)
        return [f"NO GAIN: nothing beat the finetuned model on dev ({100 * base.accuracy:.1f}%; best other "
                + (f"{100 * best.accuracy:.1f}% at {best.key}" if best else "none")
                + "): the bundle written is the finetuned model itself (mu = 0, lambda = 0), flagged in its "
                "manifest (tune.beats_finetuned = false)"]
    chosen = result.chosen()
    wins_losses = tasks.discordant(base.correct, chosen.correct)
    p = tasks.mcnemar_exact(*wins_losses)
    if p >= 0.05:
        return [f"the chosen setting beats finetuned on dev by {100 * (chosen.accuracy - base.accuracy):.1f} points, "
                f"but the dev set cannot tell them apart (McNemar p = {p:.2g}, {wins_losses[1]} wins / "
                f"{wins_losses[0]} losses): use more dev items"]
    return []


def _tune_info(result: TuneResult) -> dict:
    info = {"mu_grid": sorted(p.mu for p in result.points.values() if p.kind == "mu"),
            "lambda_grid": sorted(p.lam for p in result.points.values() if p.kind == "lambda"),
            "lambda_swept_at_mu": result.sweep_mu,
            "dev_items": result.n_items,
            "dev_accuracy": {k: round(p.accuracy, 4) for k, p in result.points.items()},
            "beats_finetuned": result.beats_finetuned}
    if result.cd_lam is not None:
        info["cd_lambda"] = result.cd_lam
    if not result.beats_finetuned:
        info["verdict"] = "nothing beat the finetuned model on dev: this bundle is the finetuned model (mu = 0)"
    return info


def write_final(src: Path, out: Path, *, lam: float, alpha: float, force: bool, tune_info: dict) -> Path:
    """Copy the chosen mu's bundle to `out` with lambda/alpha as its defaults, through the bundle writer
    (temporary name, checked, renamed when complete)."""
    from ..converters.bundle import copy_bundle

    return copy_bundle(src, out, force=force, defaults={"lambda": lam, "alpha": alpha}, tune=tune_info).path
