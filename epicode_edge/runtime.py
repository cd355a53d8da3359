"""The Python API of the online half: load a bundle (or two model files), then stream, generate or chat.

    rt = load("bundle/")                           # backend="auto": MLX on Apple silicon, else llama.cpp
    rt = load("bundle/", quant="Q4_0", n_threads=4)  # engine options as keywords, or one EngineOptions(...)
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
llama.cpp on a CPU with >= 2 cores, see AUTO_OVERLAP), candidate_head (True: the amateur's logits of
the plausible candidates only, its output layer on those rows where the engine can (MLX), none on catch-up
steps whose logits are unread; False: the whole layer every forward), explain (True: every token's Event
carries an Explain: the expert's own pick, the plausible candidates with both models' log-probs and the
contrastive scores, see decoding/explain.py) with top_logprobs (the expert's N most likely tokens, 0-20).
Defaults for lam and alpha come from the
bundle's manifest.
"""

from __future__ import annotations

import functools
import itertools
import os
import platform
import sys
import threading
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Iterator, Sequence

from .backends.base import Backend, check_same_vocab
from .decoding.batch_loop import IDLE, Cancelled  # noqa: F401  (request sources and servers use them)
from .decoding.constraint import Constraint, parse_constraint
from .decoding.contrastive import check_alpha, check_lam
from .decoding.explain import Explain, check_top_logprobs
from .defaults import DEFAULT_ALPHA, DEFAULT_LAMBDA
from .decoding.loop import (Collector, Event, Result, Stats, can_overlap, check_catch_up, check_limits, collect,
                            stream_generate)
from .decoding.sampling import check_sampling, make_logits_processors, make_sampler
from .chat_template import check_messages, check_text, render_chat  # noqa: F401  (part of the runtime's API)
from .engine_options import BACKENDS, EngineOptions
from .errors import (BackendError, BundleError, ContextFullError, EpicodeError, InputError, ParameterError,
                     UnsupportedError)
from .userdirs import unwritable_reason

__all__ = ["load", "load_models", "Runtime", "ChatSession", "Settings", "EngineOptions", "Event", "Explain", "Result",
           "Stats"]

# overlap=None (the default) turns overlap on where it applies (llama.cpp on a CPU with >= 2 cores, no thread
# count that would oversubscribe them). It is the naive loop's engine calls, so its answers equal the naive
# loop's, and on a real model it was the fastest of the exact modes: bench/decode.py on SmolLM2-135M Q8_0, 2 cores
# (docs/benchmarks.md#decode-speed).
AUTO_OVERLAP = True


# ----------------------------------------------------------------------------------------------
# settings and results
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Decoding settings of one request; `updated(**kw)` validates and returns a new one."""

    max_tokens: int = 256
    lam: float = DEFAULT_LAMBDA
    alpha: float = DEFAULT_ALPHA
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
    candidate_head: bool = True
    constraint: Constraint | None = None  # structured output (decoding/constraint.py); a response_format dict
    fast_forward: bool = True             # is parsed into one. fast_forward: forced runs in one batch
    explain: bool = False
    top_logprobs: int = 0

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
        if "constraint" in kw:
            kw["constraint"] = parse_constraint(kw["constraint"], "constraint")
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
        if not isinstance(self.candidate_head, bool):
            raise ParameterError(f"candidate_head must be True or False, got {self.candidate_head!r}")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise ParameterError(f"constraint must be a Constraint or a response_format object, got "
                                 f"{type(self.constraint).__name__}")
        if not isinstance(self.fast_forward, bool):
            raise ParameterError(f"fast_forward must be True or False, got {self.fast_forward!r}")
        if not isinstance(self.explain, bool):
            raise ParameterError(f"explain must be True or False, got {self.explain!r}")
        check_top_logprobs(self.top_logprobs)

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# the runtime
# ----------------------------------------------------------------------------------------------


class Runtime:
    """Expert and amateur backends that share a vocabulary, plus decoding defaults.

    Attributes: expert, amateur (Backends), backend ("llama.cpp" | "mlx"), defaults (Settings), bundle (or
    None), path, quant, mu. Not thread-safe: one request at a time per Runtime (each model has one cache).
    """

    def __init__(self, expert: Backend, amateur: Backend, *, lam: float = DEFAULT_LAMBDA, alpha: float = DEFAULT_ALPHA,
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
        self.notes: list[str] = []  # things the caller should tell the user (e.g. a context size changed)
        self._batched = None  # (n_slots, finetuned, expert form, amateur form) kept open by stream_many
        self._batched_busy = False  # a stream_many call is decoding with them
        self._batched_lock = threading.Lock()

    # -- prompts -----------------------------------------------------------------------------------
    def encode(self, prompt, *, raw: bool = False, system: str | None = None) -> list[int]:
        """Token ids of a prompt: a string with the chat template (raw=False), a raw string tokenized as the
        model's HF tokenizer does by default (raw=True), or a list of {'role', 'content'} messages."""
        if isinstance(prompt, str):
            check_text(prompt, "the prompt")
        if system is not None:
            check_text(system, "the system prompt")
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
            for i, m in enumerate(messages):
                check_text(m["content"], f"messages[{i}]")
        if system is not None:
            messages = [m for m in messages if m["role"] != "system"]
            messages.insert(0, {"role": "system", "content": system})
        return self.expert.tokenize(self.render(messages), special=True, add_bos=False)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        e = self.expert
        if not e.chat_template:
            raise UnsupportedError(f"{e.path}: the model has no chat template; use a raw prompt (raw=True / --raw)")
        try:
            return render_chat(e.chat_template, messages, add_generation_prompt=add_generation_prompt,
                               bos_token=e.bos_token, eos_token=e.eos_token)
        except InputError as err:
            raise InputError(f"{e.path}: {err} (a raw prompt needs no template: raw=True / --raw)") from None

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
            max_tokens=s.max_tokens, stop=s.stop, lazy=s.lazy, catch_up=s.catch_up, overlap=overlap,
            candidate_head=s.candidate_head, constraint=s.constraint, fast_forward=s.fast_forward,
            explain=s.explain, top_logprobs=s.top_logprobs)

    def overlaps(self, s: Settings | None = None) -> bool:
        """Whether a request with these settings runs the two models' forwards at the same time."""
        s = s or self.defaults
        if not can_overlap(self.expert, self.amateur, s.lam, s.lazy):
            return False
        if s.overlap is None:
            return self._auto_overlap()
        return s.overlap

    def batch_overlaps(self, overlap: bool | None = None, finetuned: bool = False) -> bool:
        """Whether stream_many runs the two models' multi-sequence decodes at the same time, half the cores
        each (decoding/batch_loop.py). overlap None: the defaults' setting, and where that is None too, the
        same auto rule as one request's overlap. Never for finetuned (one model) or an engine that cannot
        decode from two threads (MLX)."""
        if finetuned or not (self.expert.concurrent and self.amateur.concurrent):
            return False
        overlap = self.defaults.overlap if overlap is None else overlap
        return self._auto_overlap() if overlap is None else bool(overlap)

    def _auto_overlap(self) -> bool:
        """On a CPU with >= 2 cores, where no given thread count would oversubscribe them."""
        cores = os.cpu_count() or 1
        return AUTO_OVERLAP and cores >= 2 and all(
            b.on_cpu and 2 * (b.n_threads_given or 1) <= cores for b in (self.expert, self.amateur))

    def _share_cores(self, parts: int) -> None:
        for b in (self.expert, self.amateur):
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
        return stream_generate(self.amateur, None, ids, lam=0.0, alpha=1.0, max_tokens=s.max_tokens, stop=s.stop,
                               roles=("amateur", "amateur"), constraint=s.constraint, fast_forward=s.fast_forward,
                               explain=s.explain, top_logprobs=s.top_logprobs)

    def chat(self, system: str | None = None, **settings) -> "ChatSession":
        return ChatSession(self, system=system, **settings)

    # -- info and lifetime -------------------------------------------------------------------------
    def stream_many(self, requests, *, parallel: int = 8, on_event=None, cancelled=None,
                    finetuned: bool = False, overlap: bool | None = None) -> Iterator[tuple]:
        """Many requests decoded together, `parallel` at a time (continuous batching: a request takes the
        first free slot). `requests` yields (key, prompt ids, Settings), or IDLE (nothing to admit yet: the
        admitted ones go on decoding). Yields (key, Result or the exception that ended it) in completion order;
        on_event(key, Event) sees every streamed token; cancelled(key) ends a request (Cancelled) and frees its
        slot. finetuned=True decodes with the finetuned model (the amateur) alone, lambda 0. overlap: the two
        models' decodes at the same time, half the cores each (see batch_overlaps; None: auto). The batched
        contexts (KV caches of `parallel` slots per model) stay open for the next call, whose prompts then find
        their prefixes cached; release_batched() or close() frees them."""
        from .decoding.batch_loop import generate_batched

        if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
            raise ParameterError(f"parallel must be an integer >= 1, got {parallel!r}")
        (e, a), kept = self._batched_pair(parallel, finetuned)
        vocab = self.amateur if finetuned else self.expert
        if finetuned:
            requests = (r if r is IDLE else (r[0], r[1], replace(r[2], lam=0.0)) for r in requests)
        both = self.batch_overlaps(overlap, finetuned)
        ok = False
        try:
            for m in {id(e): e, id(a): a}.values():
                m.share_cores(2 if both else 1)
            yield from generate_batched(e, a, vocab, requests, on_event=on_event,
                                        cancelled=cancelled, overlap=both)
            ok = True
        finally:
            with self._batched_lock:
                mine = kept and self._batched is not None and self._batched[2] is e  # (not released meanwhile)
                if mine:
                    self._batched_busy = False
                    if not ok:  # a call that failed or was abandoned: its forms are closed, not kept
                        self._batched = None
                keep = mine and ok  # open for the next call: its slots' caches (a system prompt), no new contexts
            if not keep:  # (or forms of its own, beside another call's)
                e.close()
                if a is not e:
                    a.close()

    def _batched_pair(self, parallel: int, finetuned: bool) -> tuple:
        """((expert form, amateur form), kept): the batched forms stream_many decodes with, those kept from the
        last call when they fit (same slots, same role) and no other call uses them, else new ones (finetuned:
        the amateur's, one form for both); kept: they are the runtime's kept forms, now marked in use."""
        with self._batched_lock:
            busy = self._batched_busy
            if not busy:
                if self._batched is not None and self._batched[:2] == (parallel, finetuned):
                    self._batched_busy = True
                    return self._batched[2:], True
                self._release_kept()
        if finetuned:
            from .backends.multiseq import open_multiseq

            check_kv_memory(self, parallel, roles=1)
            pair = (open_multiseq(self.amateur, parallel),) * 2
        else:
            pair = self.multiseq(parallel)
        if busy:
            return pair, False
        with self._batched_lock:
            if self._batched_busy:  # another call took the place meanwhile
                return pair, False
            self._batched, self._batched_busy = (parallel, finetuned, *pair), True
        return pair, True

    def release_batched(self) -> None:
        """Close the batched contexts stream_many keeps open between calls (their KV caches' memory); the next
        batched call opens new ones (forms in use by a call in flight are closed when it ends). Runtime.close
        does it too."""
        with self._batched_lock:
            if self._batched_busy:  # the call in flight closes them at its end (kept no more)
                self._batched, self._batched_busy = None, False
            else:
                self._release_kept()

    def _release_kept(self) -> None:
        kept, self._batched = self._batched, None
        if kept is not None:
            for m in {id(kept[2]): kept[2], id(kept[3]): kept[3]}.values():
                m.close()

    def multiseq(self, n_slots: int) -> tuple:
        """(expert, amateur) multi-sequence forms of the two models, n_slots KV sequences each, decoded together
        (decoding/batch_loop.py): the same loaded weights, engine settings and adapters. Close both."""
        from .backends.multiseq import open_multiseq

        check_kv_memory(self, n_slots)  # refuse caches that cannot fit, before allocating them
        return open_pair(lambda: open_multiseq(self.expert, n_slots), lambda e: open_multiseq(self.amateur, n_slots))

    def describe(self) -> dict:
        return {"path": str(self.path), "backend": self.backend, "quant": self.quant, "mu": self.mu,
                "expert": str(self.expert.path), "amateur": str(self.amateur.path), "n_ctx": self.expert.n_ctx,
                "vocab_size": self.expert.vocab_size, "defaults": self.defaults.as_dict()}

    def close(self) -> None:
        self.release_batched()
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
        self.settings = runtime.settings(**settings)
        self.system = None
        self.set_system(system)
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

    def set_system(self, system: str | None) -> None:
        """Set (or with None / "" clear) the system prompt; the conversation stays. Refused when the system
        prompt alone, rendered with the chat template and an empty message, leaves less room than an answer
        of max_tokens (at most half the context) in the context: every turn would fail on it."""
        if system:
            check_text(system, "the system prompt")
            e = self.runtime.expert
            if e.chat_template:
                turn = [{"role": "system", "content": system}, {"role": "user", "content": ""}]
                n = len(e.tokenize(self.runtime.render(turn), special=True, add_bos=False))
                room = min(self.settings.max_tokens, e.n_ctx // 2)
                if n + room > e.n_ctx:
                    raise ContextFullError(
                        f"the system prompt takes {n} tokens with the chat template, more than the {e.n_ctx - room} "
                        f"of the context ({e.n_ctx} tokens) that leave room for an answer of {room} tokens (shorten "
                        "it, or raise n_ctx)")
        self.system = system or None

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
        check_text(text, "the message")
        if self.system is not None:
            check_text(self.system, "the system prompt")
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
        got = Collector()
        first = next(events)  # a turn refused before any work (e.g. a full context) leaves no trace
        self._known, self._last_prompt = None, ids
        try:
            for ev in itertools.chain([first], events):
                yield got.add(ev)
        finally:
            events.close()
            answer = got.text
            self.history += [user, {"role": "assistant", "content": answer}]
            res = got.result()
            if res is not None:
                self.last = res
                if res.stopped_by != "stop_string":  # the answer's tokens are exactly its text
                    self._known = (rendered + answer, ids + res.tokens)

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


def set_cpu_repack(mode: str | None, via: str = "set_mode") -> None:
    """llama.cpp's extra CPU kernels (AMX, repacked weights) for models loaded from now on: "auto" (use them
    where a one-off probe shows they run on this CPU), "on", "off"; None: $EPICODE_EDGE_CPU_REPACK, else auto."""
    from .backends import cpu_kernels as ck

    ck.set_mode(mode, via)


def cpu_kernels(refresh: bool = False):
    """The llama.cpp CPU-kernel decision in force (backends.cpu_kernels.Decision: use_extra_bufts, reason)."""
    from .backends import cpu_kernels as ck

    return ck.decide(refresh=refresh)


def system_info(refresh: bool = False) -> dict:
    """Engines and CPU kernels on this machine, for `epicode-edge doctor` (refresh: probe the CPU again)."""
    from importlib import metadata

    from .version import __version__
    from .backends import cpu_kernels as ck

    info = {"version": __version__, "python": platform.python_version(),
            "platform": f"{platform.system()} {platform.machine()}"}
    try:
        if refresh:
            ck.decide(refresh=True)
        info["llama.cpp"] = ck.system_info()
    except ImportError as e:
        info["llama.cpp"] = {"error": f"llama-cpp-python is not installed ({e})"}
    try:
        info["mlx"] = f"mlx {metadata.version('mlx')}, mlx-lm {metadata.version('mlx-lm')}" + \
            ("" if apple_silicon() else " (CPU only: Apple-silicon GPU needs macOS)")
    except metadata.PackageNotFoundError:
        info["mlx"] = "not installed"
    return info


def apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def open_backend(path, backend: str = "auto", engine: EngineOptions | None = None, **options) -> Backend:
    """One model on one engine: a .gguf file on llama.cpp, an MLX/HF folder on MLX. engine (or its fields as
    keywords): n_ctx, n_threads, n_gpu_layers, n_batch, kv_type; its backend is not read (the argument is)."""
    engine = EngineOptions.of(engine, **options)
    path = Path(path)
    if backend == "auto":
        backend = "llama.cpp" if path.suffix == ".gguf" else "mlx"
    try:
        if backend == "llama.cpp":
            from .backends.llamacpp import LlamaCppBackend

            return LlamaCppBackend(path, **engine.backend_kwargs())
        from .backends.mlx import MLXBackend

        if engine.kv_type is not None:
            raise ParameterError("the KV cache type (kv_type / --cache-type) applies to llama.cpp only")
        if engine.batch_steps != "auto":
            raise ParameterError("batch_steps / --batch-steps applies to llama.cpp only (MLX decodes a step's "
                                 "tokens in one batched forward)")
        return MLXBackend(path, n_ctx=engine.n_ctx)
    except EpicodeError:
        raise
    except Exception as e:  # a model file that is not what it claims: one line, not the engine's traceback
        msg = " ".join(str(e).split())[:200]
        if type(e).__module__.startswith("jinja2"):  # llama-cpp-python parses the chat template at load
            raise BundleError(f"{path}: the model's chat template is not valid Jinja ({msg}); "
                              "llama-cpp-python cannot load it") from None
        raise BackendError(f"{path}: {backend} cannot load the model ({type(e).__name__}: {msg})") from None


def open_pair(open_first, open_second) -> tuple[Backend, Backend]:
    """(first, second) backends, or neither: open_first() then open_second(first); the first is closed when
    the second fails."""
    first = open_first()
    try:
        return first, open_second(first)
    except BaseException:
        first.close()
        raise


def load_models(expert, amateur, engine: EngineOptions | None = None, *, lam: float = DEFAULT_LAMBDA,
                alpha: float = DEFAULT_ALPHA, **options) -> Runtime:
    """A Runtime from two explicit model paths (two .gguf files, or two MLX/HF folders). engine (or its
    fields as keywords): as load() takes it; quant and amateur_quant pick a bundle's files, so not here."""
    engine = EngineOptions.of(engine, **options)
    if engine.quant is not None or engine.amateur_quant is not None:
        raise ParameterError("quant and amateur_quant pick a bundle's GGUF files: load_models takes the model files")
    check_lam(lam), check_alpha(alpha)
    e, a = open_pair(lambda: open_backend(expert, engine.backend, engine),
                     lambda e: open_backend(amateur, e.name, engine))
    return _runtime(e, a, engine.n_ctx, lam=lam, alpha=alpha)


def _runtime(e, a, n_ctx: int | None = None, **kw) -> Runtime:
    try:
        rt = Runtime(e, a, **kw)
    except BaseException:
        e.close()
        a.close()
        raise
    if n_ctx is not None and e.n_ctx != n_ctx:  # llama.cpp: at least 256, rounded up to a multiple of 256
        rt.notes.append(f"{e.name} uses a context of {e.n_ctx} tokens, not the {n_ctx} asked for "
                        f"(its minimum or rounding)")
    return rt


def load(bundle, engine: EngineOptions | None = None, *, roles: tuple[str, str] = ("expert", "amateur"),
         **options) -> Runtime:
    """A Runtime over a bundle folder (the output of `convert`).

    engine: an EngineOptions, or its fields as keywords (load(b, quant="Q4_0", n_threads=4)), not both.
    backend "auto": MLX on Apple silicon when the bundle has MLX models, else llama.cpp (MLX when the bundle
    has no GGUF files). quant picks the GGUF files (default: the bundle's first quant). n_gpu_layers offloads
    layers to CUDA/Metal on llama.cpp (-1 = all). The bundle's lambda and alpha become the defaults.
    roles: the bundle's models that play expert and amateur, in either bundle layout: ("amateur", "inferior")
    for contrastive decoding of the finetuned model against the inferior one (eval's CD-only row; a bundle made
    with --with-inferior), or ("amateur", "amateur") for the finetuned model alone with the full sampling
    settings. amateur_quant: the amateur's GGUF at another quant than the expert's (a cheaper amateur,
    e.g. Q4_0 beside a Q8_0 expert: faster, and only close to the same-quant answers).
    """
    from .converters.bundle import open_bundle

    engine = EngineOptions.of(engine, **options)
    if len(roles) != 2 or not all(isinstance(r, str) for r in roles):
        raise ParameterError(f"roles must be two role names (expert, amateur), got {roles!r}")
    b = open_bundle(bundle)
    if b.manifest.get("layout") == "shared-base":  # one base GGUF + LoRA adapters (backends/llamacpp_lora.py)
        return _load_shared_base(b, engine, roles)
    backend = engine.backend
    if backend == "auto":
        backend = "mlx" if ("mlx" in b.formats and (apple_silicon() or "gguf" not in b.formats)) else "llama.cpp"
    return (_load_gguf if backend == "llama.cpp" else _load_mlx)(b, engine, roles)


def _load_gguf(b, engine: EngineOptions, roles) -> Runtime:
    """A two-model bundle on llama.cpp: the roles' GGUF files at quant (the amateur's at amateur_quant)."""
    paths = (b.gguf(roles[0], engine.quant), b.gguf(roles[1], engine.amateur_quant or engine.quant))
    label = "/".join(p.stem.split("-", 1)[-1] for p in paths[:1 + (engine.amateur_quant is not None)])
    e, a = open_pair(lambda: open_backend(paths[0], "llama.cpp", engine),
                     lambda e: open_backend(paths[1], "llama.cpp", engine))
    return _runtime(e, a, engine.n_ctx, lam=b.lam, alpha=b.alpha, bundle=b, quant=label)


def _load_mlx(b, engine: EngineOptions, roles) -> Runtime:
    """A two-model bundle on MLX: the roles' MLX folders."""
    if engine.quant is not None or engine.amateur_quant is not None:
        raise ParameterError("quant picks GGUF files: it applies to the llama.cpp backend only")
    if "mlx" not in b.formats:
        raise BundleError(f"{b.path}: the bundle has no MLX models (formats: {', '.join(b.formats)})")
    paths = (b.mlx(roles[0]), b.mlx(roles[1]))
    e, a = open_pair(lambda: open_backend(paths[0], "mlx", engine), lambda e: open_backend(paths[1], "mlx", engine))
    return _runtime(e, a, engine.n_ctx, lam=b.lam, alpha=b.alpha, bundle=b, quant=None)


def _load_shared_base(b, engine: EngineOptions, roles) -> Runtime:
    """A shared-base bundle (one base GGUF + LoRA adapters) on llama.cpp: both roles over one loaded base, or,
    with amateur_quant, the base at that quant loaded beside it for the amateur."""
    if engine.backend == "mlx":
        raise UnsupportedError(f"{b.path}: a shared-base (LoRA) bundle runs on llama.cpp only")
    from .backends.llamacpp_lora import open_roles
    from .converters.lora import fused_roles, shared_base_roles
    from .userdirs import cache_dir

    base, per_role = shared_base_roles(b, engine.quant)
    per_role = fused_roles(per_role, cache_dir())  # the expert's two adapters as one (half the LoRA work)
    if any(r not in per_role for r in roles):
        raise BundleError(f"{b.path}: shared-base bundle has no role "
                          f"{next(r for r in roles if r not in per_role)!r} (has {', '.join(per_role)})")
    opts = engine.backend_kwargs()
    label = base.stem.split("-", 1)[-1]
    if engine.amateur_quant is None:  # both roles over one loaded base
        r = open_roles(base, per_role, tuple(dict.fromkeys(roles)), **opts)
        # one role twice (the finetuned model alone, sampled): a second context, same base and adapters
        e, a = open_pair(lambda: r[roles[0]], lambda e: e.twin() if roles[0] == roles[1] else r[roles[1]])
    else:
        base_a, _ = shared_base_roles(b, engine.amateur_quant)
        label += "/" + base_a.stem.split("-", 1)[-1]
        e, a = open_pair(lambda: open_roles(base, per_role, roles[:1], **opts)[roles[0]],
                         lambda e: open_roles(base_a, per_role, roles[1:], **opts)[roles[1]])
    return _runtime(e, a, engine.n_ctx, lam=b.lam, alpha=b.alpha, bundle=b, quant=label)


def check_gguf_runs(paths, n_threads: int | None = 1, vocab_only: bool = False, adapters=None,
                    role: str | None = None) -> None:
    """What convert asks of each GGUF it wrote (paths: one path or several): llama.cpp loads it and one
    token gives finite logits (vocab_only: llama.cpp reads its architecture, hyperparameters and vocabulary
    only; convert asks this of a GGUF input before writing anything). adapters: [(GGUF LoRA file, scale), ...]
    applied to it (a shared-base bundle's role, named `role`). Runs in one child process, the files in
    order, so that an abort inside llama.cpp (a GGML_ASSERT on a value its loader does not expect) cannot
    kill the caller. Raises BackendError (cannot load, or the child died: one line naming the file, with
    llama.cpp's reason) or NumericError, for the first file that fails."""
    import json
    import signal
    import subprocess

    from .backends import cpu_kernels
    from .errors import BackendError, NumericError

    files = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not files:
        return
    env = dict(os.environ)
    mode, source = cpu_kernels.current_mode()
    if source != "default":  # a mode set in this process (the API, --cpu-repack) holds in the child too
        env[cpu_kernels.ENV] = mode
    root = str(Path(__file__).resolve().parent.parent)  # the child imports this epicode_edge, first
    code = ("import sys; root = sys.argv[1]; root in sys.path or sys.path.insert(0, root); "
            "from epicode_edge.runtime import gguf_check_child; sys.exit(gguf_check_child(sys.argv[2:]))")
    extra = json.dumps({"adapters": [[str(f), float(s)] for f, s in adapters or ()], "role": role})
    args = [sys.executable, "-c", code, root, str(n_threads or 0), "1" if vocab_only else "0", extra,
            *map(str, files)]
    r = subprocess.run(args, capture_output=True, text=True, errors="replace", env=env, stdin=subprocess.DEVNULL)
    if r.returncode == 0:
        return
    try:
        report = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        report = None
    # the child names each file on stderr before checking it: the failure is the last one's
    _, marker, tail = r.stderr.rpartition(_CHECKING)
    name, _, log = tail.partition("\n") if marker else (str(files[0]), "", r.stderr)
    path, reason = Path(name), _llama_reason(log)
    if isinstance(report, dict) and report.get("kind") in ("BackendError", "NumericError"):
        cls = NumericError if report["kind"] == "NumericError" else BackendError
        message = str(report.get("message", ""))
        if reason and reason not in message:  # llama.cpp's own words instead of llama-cpp-python's generic ones
            generic = "(Failed to load model from file: "
            message = (message[:message.index(generic)] + f"({reason})" if generic in message and message.endswith(")")
                       else f"{message} ({reason})")
        raise cls(message)
    if r.returncode < 0:
        try:
            name = signal.Signals(-r.returncode).name
        except ValueError:
            name = "unknown signal"
        how = f"the process died with signal {-r.returncode} ({name})"
    else:
        how = f"the process exited with code {r.returncode}"
    raise BackendError(f"llama.cpp could not load {path}: {how}{f': {reason}' if reason else ''}")


def _llama_reason(stderr: str) -> str:
    """llama.cpp's own words on a failed load, from its error log (or an assert's line), one line."""
    lines = [" ".join(line.split()) for line in stderr.splitlines() if line.strip()]
    for marker in ("GGML_ASSERT", "error loading model:", "error:"):
        found = [line for line in lines if marker in line]
        if found:
            line = found[-1]
            text = line.split("error loading model:", 1)[-1].strip() if marker != "GGML_ASSERT" else \
                line[line.index("GGML_ASSERT"):]
            return text[:300]
    return ""


_CHECKING = "epicode-edge: checking "  # the child's line on stderr before each file


def gguf_check_child(argv: list[str]) -> int:
    """The child process of check_gguf_runs (argv: threads, vocab_only 0/1, JSON {adapters, role}, paths...):
    0 when every file
    passes; else 1 and one JSON line on stdout ({"kind": error class, "message": ...})."""
    import json

    from .errors import EpicodeError

    import contextlib

    import llama_cpp._internals as internals
    import llama_cpp.llama as high_level

    # llama-cpp-python points stderr at /dev/null while it loads a model (verbose=False); here stderr is the
    # parent's pipe, and an abort's only words (GGML_ASSERT's line) go there
    for module in (internals, high_level):
        module.suppress_stdout_stderr = lambda disable=True: contextlib.nullcontext()
    n_threads, vocab_only, extra = int(argv[0]) or None, argv[1] == "1", json.loads(argv[2])
    adapters = [(Path(f), s) for f, s in extra["adapters"]]
    try:
        for path in map(Path, argv[3:]):
            print(f"{_CHECKING}{path}", file=sys.stderr, flush=True)
            if vocab_only:
                _load_vocab_only(path)
            else:
                _check_gguf_here(path, n_threads, adapters, extra["role"])
    except EpicodeError as e:
        print(json.dumps({"kind": type(e).__name__, "message": " ".join(str(e).split())}), flush=True)
        return 1
    return 0


def _load_vocab_only(path: Path) -> None:
    from .backends import cpu_kernels
    from .backends.llamacpp import quiet_llama_logs
    from .errors import BackendError

    import llama_cpp

    quiet_llama_logs(llama_cpp)
    try:
        llm = cpu_kernels.open_llama(path, vocab_only=True, verbose=False)
    except (ValueError, RuntimeError, OSError) as e:
        raise BackendError(f"{path}: llama.cpp cannot load the model ({' '.join(str(e).split())})") from None
    llm.close()


def _check_gguf_here(path: Path, n_threads: int | None, adapters=None, role: str | None = None) -> None:
    from .backends.llamacpp import LlamaCppBackend
    from .decoding.loop import check_finite

    role = role or path.stem.split("-", 1)[0]
    if adapters:
        from .backends.llamacpp_lora import open_roles

        b = open_roles(path, {role: list(adapters)}, (role,), n_ctx=256, n_threads=n_threads)[role]
    else:
        b = LlamaCppBackend(path, n_ctx=256, n_threads=n_threads)
    try:
        check_finite(b.prefill([b.bos_id if b.bos_id is not None else 0]), role, b)
    finally:
        b.close()


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable; else free pages), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def kv_cache_bytes(backend, n_slots: int, bytes_per_value: int = 2) -> int:
    """Bytes of the KV cache of n_slots sequences of backend.n_ctx tokens in host memory (llama.cpp on the
    CPU: from the GGUF's metadata; f16 cache). 0 where it cannot be told or is not in host memory."""
    path = Path(getattr(backend, "path", ""))
    if getattr(backend, "name", None) != "llama.cpp" or not path.is_file() or not getattr(backend, "on_cpu", True):
        return 0  # MLX allocates as it goes; with layers offloaded the cache is in device memory
    st = path.stat()
    return n_slots * int(backend.n_ctx) * _kv_values_per_position(str(path), st.st_size, st.st_mtime_ns) \
        * bytes_per_value


@functools.lru_cache(maxsize=16)
def _kv_values_per_position(path: str, size: int, mtime_ns: int) -> int:
    """K and V values one position of a GGUF model's cache holds (all layers), read from its metadata once per
    file version (reading a header with its vocabulary takes ~0.07 s: once, not per batched call)."""
    from .converters.checkpoint import GGUFCheckpoint
    from .errors import EpicodeError

    try:
        cfg = GGUFCheckpoint(Path(path)).config
    except EpicodeError:
        return 0
    arch = cfg.get("general.architecture", "")

    def key(name, default=None):
        v = cfg.get(f"{arch}.{name}", default)
        return int(v) if isinstance(v, (int, float)) else default

    layers, embd, heads = key("block_count", 0), key("embedding_length", 0), key("attention.head_count", 1) or 1
    kv_heads = key("attention.head_count_kv", heads) or heads
    k_len = key("attention.key_length", embd // heads)
    v_len = key("attention.value_length", embd // heads)
    return layers * kv_heads * (k_len + v_len)


def check_kv_memory(runtime, n_slots: int, roles: int = 2) -> None:
    """ParameterError when n_slots sequences' KV caches (both models; roles=1: the amateur's alone) cannot fit in
    the available memory."""
    need = sum(kv_cache_bytes(b, n_slots) for b in (runtime.expert, runtime.amateur)[2 - roles:])
    free = available_memory()
    if need and free is not None and need > free:
        from .converters.bundle import human_bytes

        raise ParameterError(f"parallel {n_slots}: the KV caches need {human_bytes(need)} ({n_slots} sequences x "
                             f"{runtime.expert.n_ctx} tokens x {roles} model{'s' if roles > 1 else ''}), more than "
                             f"the {human_bytes(free)} of memory available; lower --parallel or --n-ctx")


def check_output_dir(path, what: str = "output folder") -> Path:
    """A folder that will be written after a long run can be: absent (its nearest existing parent writable)
    or a writable folder. InputError naming it, before any work."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: the {what} exists and is not a folder")
    why = None if path.exists() and os.access(path, os.W_OK | os.X_OK) else unwritable_reason(path / "x")
    if why:
        raise InputError(f"{path}: the {what} cannot be written ({why})")
    return path
