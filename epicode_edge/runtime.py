"""The Python API of the online half: load a bundle (or two model files), then stream, generate or chat.

    rt = load("bundle/")                           # backend="auto": MLX on Apple silicon, else llama.cpp
    for ev in rt.stream("What is 17 * 23?"):       # chat template applied; raw=True for a plain prompt
        print(ev.text, end="")
    res = rt.generate("What is 17 * 23?", max_tokens=64, lam=0.5, alpha=0.1)
    chat = rt.chat(system="Be terse.")
    for ev in chat.send("Hi"): ...                 # later turns prefill only their new tokens
    rt.compare("What is 17 * 23?")                 # the finetuned model (the amateur) alone, greedy

Settings (keyword arguments of stream / generate / chat / send): max_tokens, lam, alpha, temp, top_p, top_k,
min_p, seed, stop, repetition_penalty, repetition_context_size, lazy (False = step the amateur on every
token, the naive loop), catch_up ("auto" | "batch" | "steps": how a lazy amateur is fed the tokens it skipped;
"steps" is bit-identical to the naive loop, see decoding/loop.py), overlap (True: the amateur's forward
runs beside the expert's in a worker thread, every token, bit-identical to lazy=False; with no n_threads given
at load each model then gets max(1, cores // 2) threads; False: one model at a time; None = auto: on for
llama.cpp on a CPU with >= 2 cores when AUTO_OVERLAP is set, which it is not by default).
Defaults for lam and alpha come from the
bundle's manifest.
"""

from __future__ import annotations

import itertools
import os
import platform
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Iterator, Sequence

from .backends.base import Backend, check_same_vocab
from .decoding.contrastive import check_alpha, check_lam
from .decoding.loop import Event, Stats, can_overlap, check_catch_up, check_limits, stream_generate
from .decoding.sampling import check_sampling, make_logits_processors, make_sampler
from .errors import BundleError, InputError, ParameterError, UnsupportedError

__all__ = ["load", "load_models", "Runtime", "ChatSession", "Settings", "Event", "Result", "Stats"]

BACKENDS = ("auto", "llama.cpp", "mlx")
# overlap=None turns overlap on where it applies only if True. Off: on the shared 2-core CI CPU (load ~5) the
# overlap row of bench/decode.py equalled the naive loop at the same thread count (77 vs 80 tok/s, 1 thread each);
# its gain needs a second idle core. Measure on the target (bench/decode.py) before turning it on.
AUTO_OVERLAP = False


# ----------------------------------------------------------------------------------------------
# settings and results
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Decoding settings of one request; `updated(**kw)` validates and returns a new one."""

    max_tokens: int = 256
    lam: float = 0.5
    alpha: float = 0.1
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple = ()
    repetition_penalty: float | None = None
    repetition_context_size: int = 20
    lazy: bool = True
    catch_up: str = "auto"
    overlap: bool | None = None

    def updated(self, **kw) -> "Settings":
        if "lambda" in kw:
            kw["lam"] = kw.pop("lambda")
        names = {f.name for f in fields(self)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise ParameterError(f"unknown setting {unknown[0]!r} (settings: {', '.join(sorted(names))})")
        kw = {k: v for k, v in kw.items() if v is not None or k in ("seed", "repetition_penalty", "overlap")}
        if "stop" in kw:
            kw["stop"] = tuple(check_limits(0, kw["stop"]))
        s = replace(self, **kw)
        s.check()
        return s

    def check(self) -> None:
        check_lam(self.lam)
        check_alpha(self.alpha)
        check_sampling(self.temp, self.top_p, self.top_k, self.min_p, self.seed)
        check_limits(self.max_tokens, self.stop)
        make_logits_processors(self.repetition_penalty, self.repetition_context_size)
        check_catch_up(self.catch_up)
        if not isinstance(self.lazy, bool):
            raise ParameterError(f"lazy must be True or False, got {self.lazy!r}")
        if self.overlap is not None and not isinstance(self.overlap, bool):
            raise ParameterError(f"overlap must be True, False or None (auto), got {self.overlap!r}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Result:
    """A finished request (what generate() and compare() return)."""

    text: str
    tokens: list[int]               # the answer's token ids (the terminating EOS / end-of-turn excluded)
    finish_reason: str              # "stop" | "length"
    stopped_by: str                 # "eos" | "stop_string" | "max_tokens" | "context_full"
    prompt_tokens: int
    completion_tokens: int
    changed_tokens: int             # picks where contrastive decoding changed the expert's choice
    stats: Stats = field(repr=False, default_factory=Stats)

    @property
    def timings(self) -> dict:
        """Counts and timings as a flat dict (ttft_s, decode_s, total_s, tokens_per_s, skip_rate, ...)."""
        return self.stats.as_dict()

    def as_dict(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "finish_reason": self.finish_reason,
                "stopped_by": self.stopped_by, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "changed_tokens": self.changed_tokens,
                "timings": self.timings}


def collect(events: Iterator[Event]) -> Result:
    """Join a stream of Events into a Result."""
    text, tokens, last = [], [], None
    for ev in events:
        text.append(ev.text)
        if ev.token is not None:
            tokens.append(ev.token)
        last = ev
    st = last.stats
    return Result("".join(text), tokens, last.finish_reason, last.stopped_by, st.prompt_tokens,
                  st.completion_tokens, st.changed, st)


# ----------------------------------------------------------------------------------------------
# chat templates (as transformers renders them)
# ----------------------------------------------------------------------------------------------


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                bos_token: str | None = None, eos_token: str | None = None, **extra) -> str:
    """Render a Jinja chat template in a sandbox, with the variables and helpers transformers provides."""
    env = _jinja_env()
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token or "",
            eos_token=eos_token or "", **extra)
    except Exception as e:  # jinja2 TemplateError or raise_exception() from the template
        raise InputError(f"chat template failed: {' '.join(str(e).split())}") from None


def _jinja_env():
    import json
    from datetime import datetime

    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ParameterError("messages must be a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ParameterError(f"messages[{i}] must be an object with string 'role' and 'content'")
    return [dict(m) for m in messages]


# ----------------------------------------------------------------------------------------------
# the runtime
# ----------------------------------------------------------------------------------------------


class Runtime:
    """Expert and amateur backends that share a vocabulary, plus decoding defaults.

    Attributes: expert, amateur (Backends), backend ("llama.cpp" | "mlx"), defaults (Settings), bundle (or
    None), path, quant, mu. Not thread-safe: one request at a time per Runtime (each model has one cache).
    """

    def __init__(self, expert: Backend, amateur: Backend, *, lam: float = 0.5, alpha: float = 0.1,
                 bundle=None, quant: str | None = None):
        if expert is amateur:
            raise ParameterError("expert and amateur must be two backends (each holds its own cache)")
        check_same_vocab(expert, amateur)
        self.expert, self.amateur = expert, amateur
        self.backend = expert.name
        self.defaults = Settings().updated(lam=lam, alpha=alpha)
        self.bundle = bundle
        self.path = bundle.path if bundle is not None else expert.path
        self.quant = quant
        self.mu = bundle.mu if bundle is not None else None

    # -- prompts -----------------------------------------------------------------------------------
    def encode(self, prompt, *, raw: bool = False, system: str | None = None) -> list[int]:
        """Token ids of a prompt: a string with the chat template (raw=False), a raw string tokenized as the
        model's HF tokenizer does by default (raw=True), or a list of {'role', 'content'} messages."""
        if isinstance(prompt, str) and raw:
            if system is not None:
                raise ParameterError("a system prompt needs the chat template: drop raw or the system prompt")
            return self.expert.tokenize(prompt, special=True)
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif raw:
            raise ParameterError("raw=True takes a prompt string, not a list of messages")
        else:
            messages = check_messages(prompt)
        if system is not None:
            messages = [m for m in messages if m["role"] != "system"]
            messages.insert(0, {"role": "system", "content": system})
        return self.expert.tokenize(self.render(messages), special=True, add_bos=False)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        e = self.expert
        if not e.chat_template:
            raise UnsupportedError(f"{e.path}: the model has no chat template; use a raw prompt (raw=True / --raw)")
        return render_chat(e.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=e.bos_token, eos_token=e.eos_token)

    # -- requests ----------------------------------------------------------------------------------
    def settings(self, **kw) -> Settings:
        return self.defaults.updated(**kw)

    def stream(self, prompt, *, raw: bool = False, system: str | None = None, **settings) -> Iterator[Event]:
        """Events of one answer (text deltas, then a final event with finish_reason and stats)."""
        s = self.settings(**settings)
        return self.stream_ids(self.encode(prompt, raw=raw, system=system), s)

    def generate(self, prompt, *, raw: bool = False, system: str | None = None, **settings) -> Result:
        return collect(self.stream(prompt, raw=raw, system=system, **settings))

    def stream_ids(self, ids: Sequence[int], s: Settings | None = None) -> Iterator[Event]:
        """The contrastive loop on prompt token ids (the caches of both models are reused where they match)."""
        s = s or self.defaults
        overlap = self.overlaps(s)
        self._share_cores(2 if overlap else 1)
        return stream_generate(
            self.expert, self.amateur, ids, lam=s.lam, alpha=s.alpha,
            sampler=make_sampler(s.temp, s.top_p, s.top_k, s.min_p, s.seed),
            processors=make_logits_processors(s.repetition_penalty, s.repetition_context_size),
            max_tokens=s.max_tokens, stop=s.stop, lazy=s.lazy, catch_up=s.catch_up, overlap=overlap)

    def overlaps(self, s: Settings | None = None) -> bool:
        """Whether a request with these settings runs the two models' forwards at the same time."""
        s = s or self.defaults
        if not can_overlap(self.expert, self.amateur, s.lam, s.lazy):
            return False
        if s.overlap is None:  # auto: not where given thread counts would oversubscribe the cores
            cores = os.cpu_count() or 1
            return AUTO_OVERLAP and cores >= 2 and all(
                getattr(b, "on_cpu", False) and 2 * (getattr(b, "n_threads_given", None) or 1) <= cores
                for b in (self.expert, self.amateur))
        return s.overlap

    def _share_cores(self, parts: int) -> None:
        for b in (self.expert, self.amateur):
            if hasattr(b, "share_cores"):
                b.share_cores(parts)

    def compare(self, prompt, *, raw: bool = False, system: str | None = None, **settings) -> Result:
        """The finetuned model (the amateur) alone, greedy: the baseline next to EpiCoDe's answer.

        Uses max_tokens and stop from the settings; sampling settings are ignored. It runs on the amateur's
        cache: a later contrastive request re-prefills the amateur from where the two prompts diverge
        (the expert's cache is untouched).
        """
        s = self.settings(**settings)
        return collect(self.compare_ids(self.encode(prompt, raw=raw, system=system), s))

    def compare_ids(self, ids: Sequence[int], s: Settings | None = None) -> Iterator[Event]:
        s = s or self.defaults
        self._share_cores(1)
        return stream_generate(self.amateur, None, ids, lam=0.0, alpha=1.0, max_tokens=s.max_tokens, stop=s.stop)

    def chat(self, system: str | None = None, **settings) -> "ChatSession":
        return ChatSession(self, system=system, **settings)

    # -- info and lifetime -------------------------------------------------------------------------
    def describe(self) -> dict:
        return {"path": str(self.path), "backend": self.backend, "quant": self.quant, "mu": self.mu,
                "expert": str(self.expert.path), "amateur": str(self.amateur.path), "n_ctx": self.expert.n_ctx,
                "vocab_size": self.expert.vocab_size, "defaults": self.defaults.as_dict()}

    def close(self) -> None:
        for b in (self.expert, self.amateur):
            b.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<Runtime {self.path} backend={self.backend} lam={self.defaults.lam} alpha={self.defaults.alpha}>"


class ChatSession:
    """A multi-turn conversation over a Runtime.

    Each send() renders the whole conversation with the chat template. When the previous turn's prompt and
    answer are a prefix of the new rendering (append-only templates, the usual case), the new prompt is the
    previous prompt's ids + the answer's token ids as generated + the tokens of the new text only (as
    llama-cli does), so the models' caches match exactly; otherwise the rendering is tokenized whole. Either
    way the loop truncates each model's cache to its common prefix with the prompt and prefills only the
    rest (the amateur lazily, when its logits are next needed).
    """

    def __init__(self, runtime: Runtime, system: str | None = None, **settings):
        self.runtime = runtime
        self.system = system
        self.settings = runtime.settings(**settings)
        self.history: list[dict] = []  # user / assistant messages (the system prompt is kept apart)
        self.last: Result | None = None
        self._known: tuple[str, list[int]] | None = None  # (rendered text, its ids) of prompt + answer so far
        self._last_prompt: list[int] | None = None

    @property
    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self.history]

    def set(self, **settings) -> None:
        self.settings = self.settings.updated(**settings)

    def reset(self) -> None:
        """Forget the conversation (the system prompt and settings stay; the caches are reused as they match)."""
        self.history = []
        self.last = None
        self._known = self._last_prompt = None

    def send(self, text: str, **overrides) -> Iterator[Event]:
        """Stream the answer to a user message. The answer joins the history when the stream ends or is
        closed early (Ctrl-C): what was streamed is what the history keeps."""
        if not isinstance(text, str):
            raise ParameterError("a chat message must be a string")
        s = self.settings.updated(**overrides) if overrides else self.settings
        user = {"role": "user", "content": text}
        rendered = self.runtime.render(self.messages + [user])
        ids = self._ids(rendered)
        return self._run(user, rendered, ids, self.runtime.stream_ids(ids, s))

    def _ids(self, rendered: str) -> list[int]:
        tokenize = self.runtime.expert.tokenize
        if self._known is not None and rendered.startswith(self._known[0]):
            text, ids = self._known
            return ids + tokenize(rendered[len(text):], special=True, add_bos=False)
        return tokenize(rendered, special=True, add_bos=False)

    def _run(self, user: dict, rendered: str, ids: list[int], events: Iterator[Event]) -> Iterator[Event]:
        pieces, tokens, last = [], [], None
        first = next(events)  # a turn refused before any work (e.g. a full context) leaves no trace
        self._known, self._last_prompt = None, ids
        try:
            for ev in itertools.chain([first], events):
                pieces.append(ev.text)
                if ev.token is not None:
                    tokens.append(ev.token)
                last = ev
                yield ev
        finally:
            events.close()
            answer = "".join(pieces)
            self.history += [user, {"role": "assistant", "content": answer}]
            if last is not None and last.final:
                st = last.stats
                self.last = Result(answer, tokens, last.finish_reason, last.stopped_by, st.prompt_tokens,
                                   st.completion_tokens, st.changed, st)
                if last.stopped_by != "stop_string":  # the answer's tokens are exactly its text
                    self._known = (rendered + answer, ids + tokens)

    def ask(self, text: str, **overrides) -> Result:
        """send() run to the end."""
        collect(self.send(text, **overrides))
        return self.last

    def compare(self, **overrides) -> Result:
        """The finetuned model alone (greedy) on the last prompt (the history up to the last user message).
        Runs on the amateur's cache: the next send() re-prefills the amateur from that prompt's end."""
        if self._last_prompt is None:
            raise ParameterError("nothing to compare: no user message yet")
        s = self.settings.updated(**overrides) if overrides else self.settings
        return collect(self.runtime.compare_ids(self._last_prompt, s))


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------


def apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ParameterError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def _check_engine_options(n_ctx, n_threads, n_gpu_layers) -> None:
    if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx < 1:
        raise ParameterError(f"n_ctx must be an integer >= 1, got {n_ctx!r}")
    if n_threads is not None and (not isinstance(n_threads, int) or n_threads < 1):
        raise ParameterError(f"n_threads must be an integer >= 1, got {n_threads!r}")
    if not isinstance(n_gpu_layers, int) or n_gpu_layers < -1:
        raise ParameterError(f"n_gpu_layers must be an integer >= -1 (-1 = all), got {n_gpu_layers!r}")


def open_backend(path, backend: str, *, n_ctx: int = 2048, n_threads: int | None = None,
                 n_gpu_layers: int = 0, **engine_kw) -> Backend:
    """One model on one engine: a .gguf file on llama.cpp, an MLX/HF folder on MLX."""
    path = Path(path)
    if backend == "auto":
        backend = "llama.cpp" if path.suffix == ".gguf" else "mlx"
    if backend == "llama.cpp":
        from .backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(path, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, **engine_kw)
    from .backends.mlx import MLXBackend

    return MLXBackend(path, n_ctx=n_ctx, **engine_kw)


def load_models(expert, amateur, *, backend: str = "auto", n_ctx: int = 2048, n_threads: int | None = None,
                n_gpu_layers: int = 0, lam: float = 0.5, alpha: float = 0.1, **engine_kw) -> Runtime:
    """A Runtime from two explicit model paths (two .gguf files, or two MLX/HF folders)."""
    _check_backend(backend)
    _check_engine_options(n_ctx, n_threads, n_gpu_layers)
    check_lam(lam), check_alpha(alpha)
    e = open_backend(expert, backend, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, **engine_kw)
    try:
        a = open_backend(amateur, e.name, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, **engine_kw)
    except BaseException:
        e.close()
        raise
    return _runtime(e, a, lam=lam, alpha=alpha)


def _runtime(e, a, **kw) -> Runtime:
    try:
        return Runtime(e, a, **kw)
    except BaseException:
        e.close()
        a.close()
        raise


def load(bundle, backend: str = "auto", quant: str | None = None, n_gpu_layers: int = 0, n_ctx: int = 2048,
         n_threads: int | None = None, roles: tuple[str, str] = ("expert", "amateur"), **engine_kw) -> Runtime:
    """A Runtime over a bundle folder (the output of `convert`).

    backend "auto": MLX on Apple silicon when the bundle has MLX models, else llama.cpp (MLX when the bundle
    has no GGUF files). quant picks the GGUF files (default: the bundle's first quant). n_gpu_layers offloads
    layers to CUDA/Metal on llama.cpp (-1 = all). The bundle's lambda and alpha become the defaults.
    roles: which of the bundle's models play expert and amateur, e.g. ("amateur", "inferior") for
    contrastive decoding without extrapolation (eval's CD-only row) or ("amateur", "amateur") for the
    finetuned model alone with sampling.
    """
    from .converters.bundle import open_bundle

    _check_backend(backend)
    _check_engine_options(n_ctx, n_threads, n_gpu_layers)
    b = open_bundle(bundle)
    if b.manifest.get("layout") == "shared-base":  # one base GGUF + LoRA adapters (backends/llamacpp_lora.py)
        if backend == "mlx":
            raise UnsupportedError(f"{b.path}: a shared-base (LoRA) bundle runs on llama.cpp only")
        from .backends.llamacpp_lora import open_roles

        r = open_roles(b, tuple(dict.fromkeys(roles)), quant=quant, n_ctx=n_ctx, n_threads=n_threads,
                       n_gpu_layers=n_gpu_layers, **engine_kw)
        if roles[0] == roles[1]:  # one role twice: a second context over the same base and adapters
            r = dict(r, _twin=open_roles(b, (roles[1],), quant=quant, n_ctx=n_ctx, n_threads=n_threads,
                                         n_gpu_layers=n_gpu_layers, **engine_kw)[roles[1]])
        return _runtime(r[roles[0]], r["_twin" if roles[0] == roles[1] else roles[1]], lam=b.lam, alpha=b.alpha, bundle=b,
                        quant=b.gguf("base", quant).stem.split("-", 1)[-1])
    if backend == "auto":
        backend = "mlx" if ("mlx" in b.formats and (apple_silicon() or "gguf" not in b.formats)) else "llama.cpp"
    if backend == "llama.cpp":
        paths = (b.gguf(roles[0], quant), b.gguf(roles[1], quant))
        quant = paths[0].stem.split("-", 1)[-1]
    else:
        if quant is not None:
            raise ParameterError("quant picks GGUF files: it applies to the llama.cpp backend only")
        if "mlx" not in b.formats:
            raise BundleError(f"{b.path}: the bundle has no MLX models (formats: {', '.join(b.formats)})")
        paths = (b.mlx(roles[0]), b.mlx(roles[1]))
    opts = dict(n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, **engine_kw)
    e = open_backend(paths[0], backend, **opts)
    try:
        a = open_backend(paths[1], backend, **opts)
    except BaseException:
        e.close()
        raise
    return _runtime(e, a, lam=b.lam, alpha=b.alpha, bundle=b, quant=quant if backend == "llama.cpp" else None)
