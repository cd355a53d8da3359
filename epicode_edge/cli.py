"""The `epicode-edge` command line: thin wiring from options to library calls.

Each command is a library function first; this file only parses options, shows progress and turns
EpicodeError into a one-line message with a non-zero exit code. Engines are imported lazily, so
`epicode-edge --help` works where one engine is missing.

Sections are owned by area (convert / runtime / apps): keep each command's wiring in its own block.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .errors import EpicodeError


class _Group(click.Group):
    """Turns library errors into `Error: <one line>` and exit code 1; Ctrl-C into exit code 130."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EpicodeError as e:
            raise click.ClickException(_one_line(e)) from None
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            sys.exit(130)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="epicode-edge")
def main():
    """EpiCoDe on your own machine: extrapolate a finetuned model's checkpoints, then decode
    contrastively with the extrapolated expert against the finetuned amateur, offline, on
    llama.cpp (CPU/CUDA/Metal) or MLX (Apple silicon).

    \b
    Typical use:
      epicode-edge convert --finetuned ft/ --inferior ep1/ --mu 0.3 --to gguf -o bundle/
      epicode-edge generate bundle/ "What is 17 * 23?"
      epicode-edge chat bundle/
    """
    _preload_llama_cpp()


def _preload_llama_cpp() -> None:
    """Load llama.cpp's library before numpy: with a CUDA build, loading a model segfaulted when numpy had
    been imported first (seen on an H200 machine, numpy 2.5.2). Missing llama-cpp-python is not an error
    here: the commands that need it say so."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # ImportError, or a broken build: reported by the engine when it is used
        pass


# ----------------------------------------------------------------------------------------------
# convert / info  (converters/)
# ----------------------------------------------------------------------------------------------


@main.command("convert")
@click.option("--finetuned", required=True, type=click.Path(path_type=Path),
              help="The finetuned checkpoint (HF folder or .gguf), e.g. after epoch 2.")
@click.option("--inferior", required=True, type=click.Path(path_type=Path),
              help="An earlier checkpoint of the same run (HF folder or .gguf), e.g. after epoch 1.")
@click.option("--mu", required=True, type=float, help="Extrapolation strength: expert = ft + mu * (ft - inf).")
@click.option("--to", default="gguf", show_default=True, help="Output formats, comma-separated: gguf, mlx, hf.")
@click.option("--quant", default="Q8_0", show_default=True,
              help="GGUF quant types, comma-separated: F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0.")
@click.option("--mlx-bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default=None,
              help="Quantize the MLX folders to this many bits (default: not quantized).")
@click.option("--mlx-group-size", type=int, default=64, show_default=True, help="MLX quantization group size.")
@click.option("--with-inferior", is_flag=True, help="Also export the inferior model (for comparisons).")
@click.option("--lambda", "lam", type=float, default=0.5, show_default=True, help="Default contrastive strength.")
@click.option("--alpha", type=float, default=0.1, show_default=True, help="Default plausibility threshold.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at the output path.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="The bundle folder to write.")
@click.option("--base", type=click.Path(path_type=Path), default=None,
              help="Base HF model of LoRA adapters: --finetuned and --inferior are then PEFT adapter folders, and "
                   "the bundle holds one base GGUF plus the two adapters (shared base).")
@click.option("--merge", is_flag=True, help="With --base: merge the adapters into full weights (a normal bundle).")
def convert_cmd(finetuned, inferior, mu, to, quant, mlx_bits, mlx_group_size, with_inferior, lam, alpha, force, out,
                base, merge):
    """Extrapolate FINETUNED away from INFERIOR and write a bundle (expert + amateur models)."""
    import warnings

    from .converters.bundle import human_bytes
    from .converters.convert import convert
    from .converters.extrapolate import ExtrapolationWarning

    show = warnings.showwarning

    def show_warning(message, category, *args, **kw):
        if issubclass(category, ExtrapolationWarning):
            click.echo(f"Warning: {message}", err=True)
        else:
            show(message, category, *args, **kw)

    with warnings.catch_warnings(), _ConvertBar() as bar:
        warnings.simplefilter("always", ExtrapolationWarning)
        warnings.showwarning = show_warning
        kw = dict(mu=mu, to=to, quant=quant, mlx_bits=int(mlx_bits) if mlx_bits else None,
                  mlx_group_size=mlx_group_size, with_inferior=with_inferior, force=force, lam=lam, alpha=alpha,
                  progress=bar.update)
        if base is not None:
            from .converters.lora import convert_lora

            bundle = convert_lora(base, finetuned, inferior, out, merge=merge, **kw)
        elif merge:
            raise click.UsageError("--merge needs --base (the base model of the LoRA adapters)")
        else:
            bundle = convert(finetuned, inferior, out, **kw)
    s = bundle.summary
    rate = s["input_bytes"] / max(s["seconds"], 1e-9)
    what = "; ".join([f"gguf {','.join(bundle.quants)}"] * ("gguf" in bundle.formats)
                     + [f for f in bundle.formats if f != "gguf"])
    click.echo(f"Wrote {bundle.path} ({what}; roles {', '.join(bundle.roles)}): {human_bytes(s['output_bytes'])} "
               f"in {s['seconds']:.1f} s, read {human_bytes(s['input_bytes'])} at {human_bytes(rate)}/s, "
               f"peak memory {human_bytes(s['peak_rss_bytes'])}")


class _ConvertBar:
    """A tqdm bar over the input bytes of the extrapolation pass, then the later stages as its label."""

    def __enter__(self):
        self.bar = None
        return self

    def update(self, p) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=p.bytes_total or None, unit="B", unit_scale=True, desc="extrapolate",
                            file=sys.stderr, dynamic_ncols=True, leave=False, disable=None)
        if p.stage == "extrapolate":
            self.bar.update(p.bytes_done - self.bar.n)
            self.bar.set_postfix_str(p.name[-40:], refresh=False)
        else:
            self.bar.set_description(p.stage)
            self.bar.set_postfix_str(p.name, refresh=True)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


@main.command("info")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="Also check every file's sha256 against the manifest.")
def info_cmd(bundle, verify):
    """Show what a bundle holds: method parameters, sources, files per format and quant."""
    from .converters.bundle import describe, open_bundle

    for line in describe(open_bundle(bundle, verify=verify)):
        click.echo(line)

# ----------------------------------------------------------------------------------------------
# generate / chat / batch  (runtime, apps/chat.py, apps/batch.py)
# ----------------------------------------------------------------------------------------------


def runtime_options(f):
    """--backend --quant --n-gpu-layers --n-ctx --threads: how `load()` opens a bundle."""
    for opt in reversed([
        click.option("--backend", type=click.Choice(["auto", "llama.cpp", "mlx"]), default="auto", show_default=True,
                     help="Engine: auto = MLX on Apple silicon when the bundle has MLX models, else llama.cpp."),
        click.option("--quant", default=None, help="GGUF quant to load (default: the bundle's first)."),
        click.option("--n-gpu-layers", type=int, default=0, show_default=True,
                     help="Layers offloaded to CUDA/Metal on llama.cpp (-1 = all)."),
        click.option("--n-ctx", type=int, default=2048, show_default=True, help="Context size in tokens."),
        click.option("--threads", "n_threads", type=int, default=None, help="CPU threads (default: engine's)."),
        click.option("--overlap/--no-overlap", default=None,
                     help="Run the two models' forwards at once, half the cores each (default: off; "
                          "helps only with idle cores to spare)."),
    ]):
        f = opt(f)
    return f


def decoding_options(f):
    """--max-tokens --lambda --alpha --temp --top-p --top-k --min-p --seed --stop --repetition-penalty."""
    for opt in reversed([
        click.option("--max-tokens", type=int, default=256, show_default=True, help="Most tokens to generate."),
        click.option("--lambda", "lam", type=float, default=None, help="Contrastive strength (default: bundle's)."),
        click.option("--alpha", type=float, default=None, help="Plausibility threshold (default: bundle's)."),
        click.option("--temp", type=float, default=0.0, show_default=True, help="Temperature; 0 = greedy."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass."),
        click.option("--top-k", type=int, default=0, show_default=True, help="Sample among the k best (0 = off)."),
        click.option("--min-p", type=float, default=0.0, show_default=True, help="Min probability vs the best."),
        click.option("--seed", type=int, default=None, help="Random seed for sampling."),
        click.option("--stop", multiple=True, help="Stop string (not emitted); repeat for several."),
        click.option("--repetition-penalty", type=float, default=None, help="Penalty on recent tokens (>1)."),
    ]):
        f = opt(f)
    return f


@main.command("generate")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("prompt")
@decoding_options
@click.option("--system", default=None, help="System prompt (chat template).")
@click.option("--raw", is_flag=True, help="Use the prompt as is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, tokens, counts, timings).")
@runtime_options
def generate_cmd(bundle, prompt, system, raw, as_json, backend, quant, n_gpu_layers, n_ctx, n_threads, **settings):
    """Answer PROMPT with EpiCoDe (expert contrasted with amateur), streaming to stdout."""
    import json

    from .runtime import Settings, load

    settings["stop"] = settings["stop"] or None
    Settings().updated(**settings)  # out-of-range values fail before the models load
    rt = load(bundle, backend=backend, quant=quant, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, n_threads=n_threads)
    with rt:
        events = rt.stream(prompt, raw=raw, system=system, **settings)
        if as_json:
            from .runtime import collect

            click.echo(json.dumps(collect(events).as_dict(), ensure_ascii=False))
            return
        last = None
        for ev in events:
            if ev.text:
                click.echo(ev.text, nl=False)
                sys.stdout.flush()
            last = ev
        click.echo()
        st = last.stats
        click.echo(f"[{st.completion_tokens} tokens, {st.tokens_per_s:.1f} tok/s, first token {st.ttft_s:.2f} s, "
                   f"finish: {last.finish_reason} ({last.stopped_by}), changed by contrastive decoding: "
                   f"{st.changed}, amateur skipped: {st.amateur_skipped}/{st.picks}]", err=True)


@main.command("chat")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--system", default=None, help="System prompt (change it later with /system).")
@decoding_options
@runtime_options
def chat_cmd(bundle, system, backend, quant, n_gpu_layers, n_ctx, n_threads, **settings):
    """Chat with EpiCoDe offline. Reads stdin: a terminal (line editing, history) or a pipe (scripted
    sessions: each line a message or a /command). /help lists the commands; Ctrl-C stops an answer and
    keeps the session; Ctrl-D or /bye exits. Each turn prefills only its new tokens."""
    from .apps.chat import ChatApp, run_repl
    from .runtime import Settings, load

    settings["stop"] = settings["stop"] or None
    Settings().updated(**settings)  # out-of-range values fail before the models load
    rt = load(bundle, backend=backend, quant=quant, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, n_threads=n_threads)
    with rt:
        run_repl(ChatApp(rt, system=system, dim=sys.stderr.isatty(), **settings))


@main.command("batch")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("input_path", metavar="INPUT.jsonl", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Results JSONL; appended to, so a rerun resumes where a run stopped.")
@click.option("--compare", is_flag=True, help="Also answer with the finetuned model alone (finetuned_text).")
@click.option("--parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="Requests decoded together (batched decoding on llama.cpp).")
@click.option("--retry-errors", is_flag=True, help="Run again the requests whose record is an error.")
@click.option("--system", default=None, help="Default system prompt (a line's own 'system' wins).")
@decoding_options
@runtime_options
def batch_cmd(bundle, input_path, output, compare, parallel, retry_errors, system, backend, quant, n_gpu_layers,
              n_ctx, n_threads, **settings):
    """Answer every request of INPUT.jsonl ({"id", "prompt"} or {"id", "messages"} a line, with optional
    per-line max_tokens, lambda, alpha, temp, top_p, top_k, min_p, seed, stop, system) into OUTPUT, one
    record a line, flushed as each finishes (completion order; "line" gives the input order). A bad line or
    a failed request becomes an error record; ids already in OUTPUT are skipped."""
    from .apps import batch
    from .runtime import Settings, load

    settings["stop"] = settings["stop"] or None
    Settings().updated(**settings)  # out-of-range values fail before the models load
    job = batch.prepare(input_path, output, retry_errors=retry_errors)  # bad paths fail before loading too
    if job.repaired:
        click.echo(f"Note: {job.repaired} (a run was interrupted mid-write).", err=True)
    for id_, line, first in job.duplicates[:5]:
        click.echo(f"Warning: duplicate id {id_!r} on line {line} (first on line {first}): skipped.", err=True)
    if len(job.duplicates) > 5:
        click.echo(f"Warning: {len(job.duplicates) - 5} more duplicate ids skipped.", err=True)
    if not job.pending:
        click.echo(f"Nothing to do: all {job.total} requests already have a record in {output}.", err=True)
        return
    rt = load(bundle, backend=backend, quant=quant, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, n_threads=n_threads)
    if parallel > 1 and not batch.batched_supported(rt):
        click.echo(f"Note: no batched decoding on {rt.backend}: requests run one at a time.", err=True)
    bar = _BatchBar()
    try:
        with rt, bar:
            summary = batch.run_job(rt, job, compare=compare, progress=bar.update, parallel=parallel,
                                    system=system, **settings)
    except KeyboardInterrupt:
        click.echo(f"\nInterrupted after {bar.new} new records; run the same command again to resume.", err=True)
        sys.exit(130)
    click.echo(summary.line(), err=True)


class _BatchBar:
    """A tqdm bar over the requests of a batch run; progress(done, total, record) drives it."""

    def __init__(self):
        self.bar, self.new = None, 0

    def update(self, done: int, total: int, record) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, initial=done, desc="batch", unit="req", file=sys.stderr,
                            dynamic_ncols=True, leave=False, disable=None)
        if record is not None:
            self.new += 1
            self.bar.update(done - self.bar.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------
# eval / tune / demo  (apps/eval.py, apps/tune.py, apps/demo.py)
# ----------------------------------------------------------------------------------------------


def _bar(desc: str, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False, disable=None)


class _StageBars:
    """One tqdm bar per stage name (a method, a grid point); progress(stage, done, total) drives it."""

    def __init__(self):
        self.bar, self.stage = None, None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.close()
            self.bar, self.stage = _bar(stage, total), stage
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@main.command("eval")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("-o", "--out-dir", type=click.Path(path_type=Path), default=None,
              help="Where eval.jsonl, report.md, accuracy.png, summary.json go [default: ./eval-BUNDLE-DATA].")
@click.option("--max-tokens", type=int, default=128, show_default=True, help="Answer length limit.")
@click.option("--extract", default="last-number", show_default=True,
              help="Answer extraction: last-number, exact, choice or regex:PATTERN (first group if any).")
@click.option("--limit", type=int, default=None, help="Score only the first N items.")
@click.option("--methods", default=",".join(("finetuned", "extrapolation", "cd", "epicode")), show_default=True,
              help="Rows to run, comma-separated.")
@click.option("--lambda", "lam", type=float, default=None, help="Contrastive strength [default: the bundle's].")
@click.option("--cd-lambda", "cd_lam", type=float, default=None,
              help="The CD-only row's lambda [default: tune's choice for CD on dev, else the bundle's lambda].")
@click.option("--alpha", type=float, default=None, help="Plausibility threshold [default: the bundle's].")
@click.option("--runs", type=int, default=1, show_default=True,
              help="Also N sampled runs (seeds 0..N-1) with a paired t-test across runs (N >= 2).")
@click.option("--temp", type=float, default=0.7, show_default=True, help="Sampling temperature of the runs.")
@click.option("--backend", type=click.Choice(["auto", "llama.cpp", "mlx"]), default="auto", show_default=True)
@click.option("--quant", default=None, help="GGUF quant of the bundle to use [default: its first].")
@click.option("--threads", "--n-threads", "n_threads", type=int, default=None, help="llama.cpp threads.")
def eval_cmd(bundle, data, out_dir, max_tokens, extract, limit, methods, lam, cd_lam, alpha, runs, temp, backend,
             quant, n_threads):
    """Accuracy of finetuned, extrapolation only, CD only and EpiCoDe on the same items of DATA (JSONL of
    {"id", "prompt"|"messages", "answer"}), with 95% intervals and exact McNemar tests against finetuned."""
    from .apps.eval import evaluate

    if out_dir is None:
        out_dir = Path(f"eval-{bundle.name}-{data.stem}")
    with _StageBars() as bars:
        report = evaluate(bundle, data, out_dir=out_dir, max_tokens=max_tokens, extract=extract, limit=limit,
                          methods=methods, lam=lam, alpha=alpha, cd_lam=cd_lam, runs=runs, temp=temp,
                          backend=backend, quant=quant, n_threads=n_threads, progress=bars)
    for w in report.warnings:
        click.echo(f"Warning: {w}", err=True)
    s = report.settings
    click.echo(f"{s['n_items']} items, mu = {s['mu']:g}, lambda = {s['lam']:g}, alpha = {s['alpha']:g}, "
               f"{s['backend']}, {s['seconds']:.0f} s")
    click.echo(report.table())
    if report.runs:
        click.echo(f"\n{runs} sampled runs (temperature {temp:g}):")
        click.echo(report.runs_table())
    click.echo(f"Wrote {out_dir / 'eval.jsonl'}, {out_dir / 'report.md'} (chart {out_dir / 'accuracy.png'})")


@main.command("tune")
@click.option("--finetuned", required=True, type=click.Path(path_type=Path), help="The finetuned checkpoint.")
@click.option("--inferior", required=True, type=click.Path(path_type=Path), help="An earlier checkpoint of its run.")
@click.option("--dev", required=True, type=click.Path(path_type=Path), help="Dev JSONL (never the test set).")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="The bundle folder to write.")
@click.option("--base", type=click.Path(path_type=Path), default=None,
              help="The base model when --finetuned/--inferior are PEFT LoRA adapters (HF folder or llama GGUF).")
@click.option("--mu-grid", default="0.025,0.05,0.1,0.2,0.3,0.5", show_default=True,
              help="mu values to try (> 0); mu = 0, the finetuned model, always competes.")
@click.option("--lambda-grid", "lam_grid", default="0.1,0.25,0.5,1,2,4", show_default=True,
              help="lambda values to try at the best mu (> 0); lambda = 0, that mu alone, always competes.")
@click.option("--alpha", type=float, default=0.1, show_default=True, help="Plausibility threshold (the paper's).")
@click.option("--quant", default="Q8_0", show_default=True, help="GGUF quant of the bundles.")
@click.option("--with-inferior", is_flag=True, help="Also put the inferior model in the bundle (for eval's CD row).")
@click.option("--cd/--no-cd", "cd", default=None,
              help="Tune the CD-only row's own lambda on dev [default: when the bundle has the inferior model].")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="Converted bundles, state.json (resume), charts [default: OUT.tune].")
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--extract", default="last-number", show_default=True)
@click.option("--limit", type=int, default=None, help="Use only the first N dev items.")
@click.option("--threads", "--n-threads", "n_threads", type=int, default=None, help="llama.cpp threads.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at OUT.")
def tune_cmd(finetuned, inferior, dev, out, base, mu_grid, lam_grid, alpha, quant, with_inferior, cd, work_dir,
             max_tokens, extract, limit, n_threads, force):
    """The paper's tuning: pick mu with the extrapolated model alone on DEV, then lambda at that mu; write
    the bundle with both. Interrupted? Run the same command again: finished grid points are kept."""
    from .apps.tune import tune

    def warn(msg):
        click.echo(f"Warning: {msg}", err=True)

    with _StageBars() as bars:
        result = tune(finetuned, inferior, dev, out, mu_grid=mu_grid, lam_grid=lam_grid, alpha=alpha, quant=quant,
                      with_inferior=with_inferior, base=base, cd=cd, work_dir=work_dir, max_tokens=max_tokens,
                      extract=extract,
                      limit=limit, n_threads=n_threads, force=force, progress=bars, warn=warn)
    if result.resumed:
        click.echo(f"Resumed: {len(result.resumed)} grid points were already done ({result.work_dir / 'state.json'})")
    click.echo(result.table())
    if result.beats_finetuned:
        click.echo(f"Chose mu = {result.mu:g}, lambda = {result.lam:g} (alpha = {result.alpha:g}); wrote {result.bundle}")
    else:
        click.echo(f"NO GAIN: nothing beat the finetuned model on dev; wrote {result.bundle} as the finetuned model "
                   "itself (mu = 0, lambda = 0), flagged in its manifest")
    if result.cd_lam is not None:
        click.echo(f"CD-only lambda (its own, on dev): {result.cd_lam:g}")
    click.echo(f"Charts: {', '.join(str(c) for c in result.charts)}")


@main.command("demo")
@click.option("-n", "--n", "n", type=int, default=6, show_default=True, help="How many test prompts to answer.")
@click.option("--max-tokens", type=int, default=None, help="Answer length limit [default: the family's].")
@click.option("--family", type=click.Path(path_type=Path), default=None,
              help="The family folder [default: models/smollm2 of this checkout; models/demo is the tiny one].")
@click.option("--eval", "eval_data", type=click.Path(path_type=Path), default=None,
              help="Score the family's tuned bundle on this JSONL (all four methods) instead of the side-by-side.")
@click.option("-o", "--out-dir", type=click.Path(path_type=Path), default=None,
              help="With --eval: where report.md, summary.json, eval.jsonl go [default: ./demo-eval].")
@click.option("--threads", "--n-threads", "n_threads", type=int, default=None, help="llama.cpp threads.")
@click.option("--color/--no-color", default=None, help="Highlight changed picks [default: on a terminal].")
def demo_cmd(n, max_tokens, family, eval_data, out_dir, n_threads, color):
    """The shipped demo: convert a model family into a bundle (cached), then answer test prompts with the
    finetuned model alone and with EpiCoDe, highlighting the picks that contrastive decoding changed, and
    end with the family's test table. With --eval DATA: score the tuned bundle on your own draw."""
    import time

    from .apps import demo, tasks
    from .runtime import load

    t0 = time.perf_counter()
    n = demo.check_n(n)
    fam = demo.family_dir(family)
    s = demo.demo_settings(fam)
    max_tokens = s["max_tokens"] if max_tokens is None else max_tokens
    with _StageBars() as bars:
        bundle, reused = demo.demo_bundle(
            fam, mu=s["mu"], base=s["base"], with_inferior=eval_data is not None,
            progress=lambda p: bars("convert", p.tensors_done, p.tensors_total or 1))
    click.echo(f"{'Reused' if reused else 'Made'} bundle {bundle.path} (mu = {s['mu']:g}) from {fam}")
    if eval_data is not None:
        from .apps.eval import evaluate

        out_dir = out_dir or Path("demo-eval")
        with _StageBars() as bars:
            report = evaluate(bundle.path, eval_data, out_dir=out_dir, max_tokens=max_tokens, extract=s["extract"],
                              lam=s["lambda"], alpha=s["alpha"], cd_lam=s["cd_lambda"], n_threads=n_threads,
                              progress=bars)
        for w in report.warnings:
            click.echo(f"Warning: {w}", err=True)
        click.echo(f"{len(report.items)} items of {eval_data}, extract {s['extract']}, "
                   f"{report.settings['seconds']:.0f} s")
        click.echo(report.table())
        click.echo(f"Wrote {out_dir / 'report.md'} and {out_dir / 'summary.json'}")
        return
    items = demo.pick_items(tasks.load_items(fam / "data" / "test.jsonl"), s["examples"], n)
    if color is None:
        color = sys.stdout.isatty()
    click.echo(f"EpiCoDe: lambda = {s['lambda']:g}, alpha = {s['alpha']:g}; greedy; "
               + ("highlighted" if color else "[[bracketed]]") + " = picks contrastive decoding changed"
               + (f"; the first {min(n, len(s['examples']))} are test items where the two differed" if s["examples"] else "")
               + "\n")
    rows = []
    with load(bundle.path, n_threads=n_threads) as rt:
        for i, row in enumerate(demo.run_demo(rt, items, max_tokens=max_tokens, extract=s["extract"],
                                              lam=s["lambda"], alpha=s["alpha"]), 1):
            rows.append(row)
            for line in demo.render_row(i, len(items), row, color=color):
                click.echo(line, color=color)
    click.echo("")
    for line in demo.summary_lines(rows):
        click.echo(line)
    if s["test_table"] and (fam / s["test_table"]).is_file():
        click.echo(f"\nThe family's test table ({fam / s['test_table']}):")
        click.echo((fam / s["test_table"]).read_text().rstrip())
    click.echo(f"({time.perf_counter() - t0:.1f} s. Your own data: epicode-edge demo --eval DATA.jsonl -o DIR)")


if __name__ == "__main__":  # pragma: no cover
    main()
