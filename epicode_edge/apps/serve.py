"""`serve`: an OpenAI-compatible HTTP server over one bundle, on localhost (Starlette, run by uvicorn).

    app = create_app(runtime, ServeConfig(parallel=4, api_key=None, name="my-bundle"))
    uvicorn.run(app, host="127.0.0.1", port=8080)

    client = openai.OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")
    client.chat.completions.create(model="my-bundle", messages=[...], extra_body={"lambda": 1.0})

Endpoints: GET / (the chat page, apps/web/chat.html), GET /health, GET /v1/models, POST /v1/chat/completions,
POST /v1/completions, streaming (server-sent events ending with `data: [DONE]`) or not. Two models: NAME
(EpiCoDe) and NAME:finetuned (the finetuned model alone, for comparison). EpiCoDe's own settings come as extra
body fields: `lambda`, `alpha` (and llama-server's `top_k`, `min_p`, `repetition_penalty`).

What contrastive decoding did, per token, on request (decoding/explain.py): the extra body field
`"epicode": {"explain": true}` adds `"epicode": {"tokens": [...]}` to every streamed chunk (the token's pick,
whether contrastive decoding changed it, the plausible candidates with the expert's and the amateur's
log-probs and scores) and `"epicode": {..., "stats": {...}}` to the one with the finish reason (in a
non-streamed answer: `epicode.tokens` and `epicode.stats`). Chat requests also take OpenAI's `logprobs` and
`top_logprobs` (0-20): the speaking model's log-probs, in `choices[0].logprobs.content`. A request without
them streams what it did before either existed: one chunk per text piece, nothing computed for them.

Structured output: OpenAI's `response_format` (`json_object`, `json_schema` with `strict`) or an extra
`grammar` (GBNF or Lark) / `regex` field (decoding/constraint.py); a bad one is 400 naming what is wrong, and
`epicode.constraint_complete` is false when max_tokens cut the answer first (finish_reason "length").

Concurrent requests are decoded together: one decoding thread per model over Runtime.stream_many (continuous
batching over `parallel` slots); beyond the slots a queue of `max_queue`, beyond that 429 with Retry-After.
A client that goes away frees its slot at once. Every bad request gets a status and a one-line message in
OpenAI's error shape; it never touches the others. Strict where clients need it: an unknown model id is 404
`model_not_found`, a field this server does not implement is 400 naming it (never silently ignored), unknown
paths and methods get JSON errors too. The server's own failures (a broken model, a decoding thread that
stopped) are 5xx `server_error`, and /health says what failed.

Hostile clients: the body is counted while it is read (413 as soon as it passes the limit, whatever the
transfer encoding), a client has `read_timeout` seconds to send its request's headers and again its body,
at most `max_connections` are open (at the limit the oldest one still sending its request is dropped to make
room), a shutdown does not wait for clients that never finished their request. See make_server().
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import math
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..decoding.constraint import grammar, parse_constraint, regex
from ..errors import (BackendError, ConstraintError, ContextFullError, EpicodeError, InputError, ParameterError,
                      UnsupportedError, one_line)
from ..decoding.explain import MAX_TOP_LOGPROBS, explain_json, openai_logprob
from ..runtime import IDLE, Cancelled, available_memory, check_messages, kv_cache_bytes

log = logging.getLogger(__name__)  # one line per request (cli.py shows it on stderr)

FINETUNED_SUFFIX = ":finetuned"


@dataclass
class ServeConfig:
    name: str = "epicode"              # the model id clients ask for (NAME, NAME:finetuned)
    parallel: int = 4                  # requests decoded together per model
    max_queue: int = 16                # requests waiting beyond the slots; more get 429
    api_key: str | None = None         # when set, `Authorization: Bearer KEY` is required
    max_body_bytes: int = 1 << 20      # larger request bodies get 413
    max_tokens_limit: int | None = None  # the most tokens a request may ask for (default: the context size)
    default_max_tokens: int = 256
    max_connections: int = 64          # open connections; beyond, the oldest still sending a request is dropped
    read_timeout: float = 15.0         # seconds to send a request's headers, and again its body
    shutdown_timeout: float = 5.0      # on shutdown, seconds answers in progress get before they are cut

    def check(self) -> None:
        """ParameterError naming the first bad setting."""
        for name, lo in (("parallel", 1), ("max_queue", 0), ("max_body_bytes", 1), ("max_connections", 1),
                         ("default_max_tokens", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ParameterError(f"serve: {name} must be an integer >= {lo}, got {v!r}")
        for name in ("read_timeout", "shutdown_timeout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ParameterError(f"serve: {name} must be a number of seconds > 0, got {v!r}")
        if self.api_key is not None and (not self.api_key or
                                         not all(0x21 <= ord(c) <= 0x7E for c in self.api_key)):
            raise ParameterError("serve: the API key must be printable ASCII without spaces (clients send it in an "
                                 "HTTP header, where other characters do not arrive as typed)")


class RequestError(Exception):
    """A request the server refuses: HTTP status, one-line message, the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers
        self.code = code


class ClientGone(Exception):
    """The client went away before its request was read whole."""


# ----------------------------------------------------------------------------------------------
# request parsing (pure)
# ----------------------------------------------------------------------------------------------


INT_LIMIT = 2 ** 63 - 1  # integer fields (top_k, seed) beyond it are refused, not passed on


def _shown(v) -> str:
    """A value for an error message, cut short (an integer of 300 digits stays readable)."""
    r = repr(v)
    return r if len(r) <= 40 else f"{r[:20]}...({len(r)} characters)"


def _number(body, name, lo=None, hi=None, integer=False):
    """body[name] checked: an int (integer) or a finite float within [lo, hi]; None when absent or null.
    RequestError(400) naming the field otherwise (an integer too large for a float included)."""
    v = body.get(name)
    if v is None:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool):
        raise RequestError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {_shown(v)}", name)
    if integer:
        lo = -INT_LIMIT if lo is None else lo
        hi = INT_LIMIT if hi is None else hi
    else:
        try:
            v = float(v)
        except OverflowError:
            raise RequestError(400, f"'{name}' is too large for a number ({_shown(v)})", name) from None
        if not math.isfinite(v):
            raise RequestError(400, f"'{name}' must be a finite number, got {v!r}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RequestError(400, f"'{name}' must be between {lo} and {hi}, got {_shown(v)}", name)
    return v


# The fields each endpoint reads. A field outside these is refused (400 naming it), not ignored: a client that
# asks for tools, JSON mode or log-probabilities must learn that it did not get them.
FIELDS = {"model", "stream", "stream_options", "max_tokens", "n", "temperature", "top_p", "top_k", "min_p", "seed",
          "stop", "lambda", "alpha", "repetition_penalty", "user", "epicode", "response_format", "grammar", "regex"}
CHAT_FIELDS = FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
COMPLETION_FIELDS = FIELDS | {"prompt", "echo"}
# Fields of OpenAI's API that are accepted at the value that asks for nothing (what some clients always send).
NEUTRAL = {"presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "logprobs": (False,),
           "top_logprobs": (0,), "best_of": (1,), "tools": ([],), "tool_choice": ("none",), "functions": ([],),
           "parallel_tool_calls": (False,), "store": (False,),
           "suffix": ("",)}
UNSUPPORTED = {"logprobs": "log-probabilities come from /v1/chat/completions only",
               "top_logprobs": "log-probabilities come from /v1/chat/completions only",
               "tools": "this server runs no tools", "tool_choice": "this server runs no tools",
               "functions": "this server runs no tools", "parallel_tool_calls": "this server runs no tools",
               "logit_bias": "logit_bias is not applied",
               "presence_penalty": "use 'repetition_penalty'", "frequency_penalty": "use 'repetition_penalty'",
               "best_of": "one answer per request", "suffix": "no insertion", "store": "nothing is stored"}


def check_fields(body: dict, kind: str) -> None:
    """RequestError(400) naming the first field this server does not implement (null counts as absent)."""
    known = CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS
    for k, v in body.items():
        if v is None or k in known:
            continue
        if k in NEUTRAL:
            if any(type(v) is type(n) and v == n for n in NEUTRAL[k]) or (
                    isinstance(v, float) and v == 0 and 0 in NEUTRAL[k]):
                continue
            raise RequestError(400, f"'{k}' is not supported by this server ({UNSUPPORTED[k]}); leave it out", k)
        raise RequestError(400, f"unknown field {_shown(k)} (this endpoint reads: {', '.join(sorted(known))})",
                           str(k)[:40])


def _content(msg: dict, i: int) -> str:
    c = msg.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in c:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(400, f"messages[{i}].content: only text parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")


def parse_request(body: Any, kind: str, *, max_tokens_limit: int, default_max_tokens: int) -> dict:
    """The request's input and settings: {"input": prompt str | messages, "settings": {...}, "stream": bool,
    "include_usage": bool, "finetuned": bool, "model": str}. Raises RequestError(400) naming the field."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    check_fields(body, kind)
    out: dict = {"model": body.get("model")}
    if out["model"] is not None and not isinstance(out["model"], str):
        raise RequestError(400, "'model' must be a string", "model")
    out["finetuned"] = bool(out["model"]) and out["model"].endswith(FINETUNED_SUFFIX)
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise RequestError(400, "'messages' must be a non-empty list", "messages")
        conv = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise RequestError(400, f"messages[{i}] must be an object", "messages")
            role = {"developer": "system"}.get(m.get("role"), m.get("role"))
            if role not in ("system", "user", "assistant"):
                raise RequestError(400, f"messages[{i}].role must be system, developer, user or assistant, "
                                        f"got {m.get('role')!r}", "messages")
            conv.append({"role": role, "content": _content(m, i)})
        try:
            out["input"] = check_messages(conv)
        except EpicodeError as e:
            raise RequestError(400, str(e), "messages") from None
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if not isinstance(p, str):
            raise RequestError(400, "'prompt' must be a string (one prompt per request)", "prompt")
        out["input"] = p
    n = _number(body, "n", 1, 1, integer=True)
    del n
    for flag in ("stream", "echo"):
        if body.get(flag) is not None and not isinstance(body[flag], bool):
            raise RequestError(400, f"'{flag}' must be true or false", flag)
    if body.get("echo"):
        raise RequestError(400, "'echo' is not supported", "echo")
    out["stream"] = bool(body.get("stream"))
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise RequestError(400, "'stream_options' must be an object", "stream_options")
    for k in so or {}:
        if k != "include_usage":
            raise RequestError(400, f"'stream_options.{str(k)[:40]}' is not supported (only include_usage)",
                               "stream_options")
    out["include_usage"] = bool((so or {}).get("include_usage"))
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if mt is None:
        mt = min(default_max_tokens, max_tokens_limit)
    elif not isinstance(mt, int) or isinstance(mt, bool) or mt < 0:
        raise RequestError(400, f"'{name}' must be an integer >= 0, got {mt!r}", name)
    elif mt > max_tokens_limit:
        raise RequestError(400, f"'{name}' is {_shown(mt)}, more than this server's limit of {max_tokens_limit}",
                           name)
    s: dict = {"max_tokens": mt}
    for field_, key, lo, hi, integer in (("temperature", "temp", 0, 2, False), ("top_p", "top_p", 0, 1, False),
                                         ("top_k", "top_k", 0, None, True), ("min_p", "min_p", 0, 1, False),
                                         ("seed", "seed", 0, None, True), ("lambda", "lam", 0, None, False),
                                         ("alpha", "alpha", 0, 1, False),
                                         ("repetition_penalty", "repetition_penalty", 0, None, False)):
        v = _number(body, field_, lo, hi, integer)
        if v is not None:
            s[key] = v
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop) or len(stop) > 16:
            raise RequestError(400, "'stop' must be a string or a list of up to 16 non-empty strings", "stop")
        s["stop"] = stop
    constraint = _constraint(body)
    if constraint is not None:
        s["constraint"] = constraint
    out.update(_explain_fields(body, kind))
    if out["explain"] or out["logprobs"]:
        s.update(explain=True, top_logprobs=out["top_logprobs"])
    out["settings"] = s
    return out


def _constraint(body: dict):
    """Structured output from `response_format` (OpenAI's json_object / json_schema with strict, or text), or
    the extra fields `grammar` (GBNF or Lark text) / `regex` (llama-server's and vLLM's way): at most one.
    RequestError(400) naming the field and what is wrong (an unsupported schema feature is named)."""
    given = {k: body[k] for k in ("response_format", "grammar", "regex") if body.get(k) is not None}
    rf = given.get("response_format")
    if isinstance(rf, dict) and rf.get("type") == "text" and len(given) > 1:
        del given["response_format"]
    if len(given) > 1:
        raise RequestError(400, f"give one of 'response_format', 'grammar', 'regex', not {' and '.join(given)}",
                           sorted(given)[1])
    if not given:
        return None
    (name, value), = given.items()
    try:
        if name == "response_format":
            return parse_constraint(value, "response_format")
        if not isinstance(value, str) or not value:
            raise RequestError(400, f"'{name}' must be a non-empty string", name)
        return grammar(value, "grammar") if name == "grammar" else regex(value, "regex")
    except ConstraintError as e:
        raise RequestError(400, one_line(e), name) from None


def _explain_fields(body: dict, kind: str) -> dict:
    """{"explain", "logprobs", "top_logprobs"} of a request: the `epicode` extra field and OpenAI's logprobs."""
    ex = body.get("epicode")
    if ex is not None:
        if not isinstance(ex, dict):
            raise RequestError(400, "'epicode' must be an object, e.g. {\"explain\": true}", "epicode")
        for k, v in ex.items():
            if k != "explain":
                raise RequestError(400, f"'epicode.{str(k)[:40]}' is not supported (only explain)", "epicode")
            if v is not None and not isinstance(v, bool):
                raise RequestError(400, "'epicode.explain' must be true or false", "epicode")
    out = {"explain": bool((ex or {}).get("explain")), "logprobs": False, "top_logprobs": 0}
    if kind == "chat":
        lp = body.get("logprobs")
        if lp is not None and not isinstance(lp, bool):
            raise RequestError(400, "'logprobs' must be true or false", "logprobs")
        out["logprobs"] = bool(lp)
        n = _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True) or 0
        if n and not out["logprobs"]:
            raise RequestError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        out["top_logprobs"] = n
    return out


# ----------------------------------------------------------------------------------------------
# the decoding threads
# ----------------------------------------------------------------------------------------------


@dataclass
class Job:
    key: int
    ids: list[int]
    settings: Any                      # runtime.Settings
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Busy(Exception):
    pass


class Scheduler:
    """One decoding thread: Runtime.stream_many over a queue of Jobs (finetuned: the amateur alone)."""

    def __init__(self, runtime, parallel: int, max_queue: int, finetuned: bool = False):
        self.rt, self.parallel, self.max_queue, self.finetuned = runtime, parallel, max_queue, finetuned
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._jobs: dict[int, Job] = {}
        self._running = 0  # handed to the decoding loop and not finished (decoding thread only)
        self.counts = {"requests": 0, "completed": 0, "cancelled": 0, "failed": 0}
        self.error: BaseException | None = None   # the decoding thread stopped with it
        self.failing: str | None = None           # the last request ended by a server-side failure (its message)
        self.ready = threading.Event()            # set once the slots are open (or opening them failed)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"epicode-serve{'-finetuned' if finetuned else ''}")
        self._thread.start()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._jobs)

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.error is not None:
                raise RuntimeError(f"the decoding thread stopped: {self.error}")
            if len(self._jobs) >= self.parallel + self.max_queue:
                raise Busy()
            self._jobs[job.key] = job
            self.counts["requests"] += 1
        self._q.put(job)

    def cancel(self, job: Job) -> None:
        job.cancelled = True

    def close(self) -> None:
        with self._lock:
            for job in self._jobs.values():
                job.cancelled = True
        self._q.put(None)
        self._thread.join(timeout=30)

    @property
    def running(self) -> int:
        return self._running

    def _source(self):
        self.ready.set()  # stream_many opened the slots before it asks for the first request
        while True:
            try:
                job = self._q.get(block=self._running == 0, timeout=None)
            except queue.Empty:
                yield IDLE
                continue
            if job is None:
                return
            if job.cancelled:
                self._finish(job, Cancelled("cancelled before it started"))
                continue
            self._running += 1
            yield job.key, job.ids, job.settings

    def _run(self) -> None:
        try:
            for key, res in self.rt.stream_many(self._source(), parallel=self.parallel, on_event=self._on_event,
                                                cancelled=self._is_cancelled, finetuned=self.finetuned):
                self._running -= 1
                self._finish(self._jobs[key], res)
        except BaseException as e:  # the engine itself failed: every request waiting or running fails
            with self._lock:
                self.error = e
                jobs = list(self._jobs.values())
            self.ready.set()
            for job in jobs:
                self._finish(job, e)

    def _is_cancelled(self, key) -> bool:
        job = self._jobs.get(key)
        return job is None or job.cancelled

    def _on_event(self, key, ev) -> None:
        job = self._jobs.get(key)
        if job is None:
            return
        if ev.explain is not None:  # explain or logprobs asked for: every token, with its data
            job.put(("token", ev))
        elif ev.text:
            job.put(("text", ev.text))

    def _finish(self, job: Job, res) -> None:
        with self._lock:
            self._jobs.pop(job.key, None)
            self.counts["cancelled" if isinstance(res, Cancelled) else
                        "failed" if isinstance(res, BaseException) else "completed"] += 1
            if not isinstance(res, BaseException):
                self.failing = None
            elif not isinstance(res, Cancelled) and _as_error(res).status >= 500:
                self.failing = one_line(res)
        job.put(("done", res))


# ----------------------------------------------------------------------------------------------
# the HTTP layer
# ----------------------------------------------------------------------------------------------


class Server:
    def __init__(self, runtime, config: ServeConfig):
        config.check()
        self.rt, self.config = runtime, config
        self.n_ctx = runtime.expert.n_ctx
        self.limit = min(config.max_tokens_limit or self.n_ctx, self.n_ctx)
        self.models = (config.name, config.name + FINETUNED_SUFFIX)
        self._schedulers: dict[bool, Scheduler] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.started = time.time()
        self._page: str | None = None

    def start(self, timeout: float = 300.0) -> None:
        """Open both models' slots now (EpiCoDe's and the finetuned model's), so that a server whose slots do not
        fit refuses to start (an EpicodeError naming --parallel / --n-ctx) instead of failing its first request."""
        p = self.config.parallel
        need = sum(kv_cache_bytes(b, p) for b in (self.rt.expert, self.rt.amateur, self.rt.amateur))
        free = available_memory()
        if need and free is not None and need > free:
            from ..converters.bundle import human_bytes

            raise ParameterError(f"serve --parallel {p}: the KV caches need {human_bytes(need)} ({p} slots x "
                                 f"{self.n_ctx} tokens, for EpiCoDe's two models and the finetuned one), more than "
                                 f"the {human_bytes(free)} of memory available; lower --parallel or --n-ctx")
        try:
            for finetuned in (False, True):
                s = self.scheduler(finetuned)
                if not s.ready.wait(timeout):
                    raise BackendError(f"serve: the {'finetuned ' if finetuned else ''}slots did not open in "
                                       f"{timeout:g} s")
                if s.error is not None:
                    e = s.error
                    if isinstance(e, EpicodeError):
                        raise type(e)(f"serve --parallel {p} --n-ctx {self.n_ctx}: {one_line(e)} (lower --parallel "
                                      "or --n-ctx)") from None
                    raise BackendError(f"serve --parallel {p}: opening the slots failed "
                                       f"({type(e).__name__}: {one_line(e)})") from None
        except BaseException:
            self.close()
            raise

    def scheduler(self, finetuned: bool) -> Scheduler:
        with self._lock:
            if finetuned not in self._schedulers:
                self._schedulers[finetuned] = Scheduler(self.rt, self.config.parallel, self.config.max_queue,
                                                        finetuned=finetuned)
            return self._schedulers[finetuned]

    def close(self) -> None:
        for s in list(self._schedulers.values()):
            s.close()

    # -- plumbing ----------------------------------------------------------------------------------
    def _check_key(self, request) -> None:
        """The key as bytes on both sides: the header's raw bytes against the key's (printable ASCII, see
        ServeConfig.check), compared in constant time."""
        if self.config.api_key is None:
            return
        auth = b""
        for k, v in request.scope["headers"]:
            if k == b"authorization":
                auth = v
                break
        token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        if not hmac.compare_digest(token, self.config.api_key.encode()):
            raise RequestError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                               kind="invalid_api_key")

    async def _body(self, request) -> Any:
        """The JSON body, counted while it is read: 413 once it passes the limit (any transfer encoding), 408
        when it does not arrive whole within read_timeout; ClientGone when the client leaves."""
        from starlette.requests import ClientDisconnect

        limit, wait = self.config.max_body_bytes, self.config.read_timeout
        too_large = RequestError(413, f"request body larger than {limit} bytes", headers={"Connection": "close"})
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise too_large
        raw = bytearray()
        try:
            async with asyncio.timeout(wait):
                async for chunk in request.stream():
                    raw += chunk
                    if len(raw) > limit:
                        raise too_large
        except TimeoutError:
            raise RequestError(408, f"the request body did not arrive whole within {wait:g} s",
                               headers={"Connection": "close"}) from None
        except ClientDisconnect:
            raise ClientGone() from None
        try:
            return json.loads(raw, parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:
            raise RequestError(400, f"the request body is not valid JSON ({' '.join(str(e).split())[:120]})") \
                from None

    @staticmethod
    def error_response(e: RequestError):
        from starlette.responses import JSONResponse

        return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}},
                            status_code=e.status, headers=e.headers)

    # -- endpoints ---------------------------------------------------------------------------------
    def health_report(self) -> tuple[int, dict]:
        """(HTTP status, body) of /health: 200 "ok", or 503 with "error" (a decoding thread stopped) or "failing"
        (the last request of a model ended by a server-side failure) and the message."""
        per, status, problem = {}, "ok", None
        for finetuned, label in ((False, self.models[0]), (True, self.models[1])):
            s = self._schedulers.get(finetuned)
            if s is None:
                continue
            err = one_line(s.error) if s.error is not None else None
            per[label] = {"slots": self.config.parallel, "busy": min(s.in_flight, self.config.parallel),
                          "queued": max(0, s.in_flight - self.config.parallel), "max_queue": self.config.max_queue,
                          "in_flight": s.in_flight, **s.counts, "error": err or s.failing}
            if err:
                status, problem = "error", f"{label}: the decoding thread stopped: {err}"
            elif s.failing and status == "ok":
                status, problem = "failing", f"{label}: the last request failed: {s.failing}"
        body = {"status": status, "model": self.config.name, "models": list(self.models),
                "parallel": self.config.parallel, "n_ctx": self.n_ctx, "slots": per,
                # the same counters under the names of earlier versions
                "schedulers": {("finetuned" if k else "epicode"): {"in_flight": s.in_flight, **s.counts}
                               for k, s in self._schedulers.items()}}
        if problem:
            body["error"] = problem
        return (200 if status == "ok" else 503), body

    async def page(self, request):
        """The chat page (apps/web/chat.html, its CSS and JS inlined). It is the same for everyone: the API key
        is asked by the page and sent with its /v1 requests. The policy header keeps it on this server."""
        from starlette.responses import HTMLResponse

        from .web import page

        if self._page is None:
            self._page = page("chat.html")
        return HTMLResponse(self._page, headers=PAGE_HEADERS)

    async def health(self, request):
        from starlette.responses import JSONResponse

        code, body = self.health_report()
        return JSONResponse(body, status_code=code)

    async def models_list(self, request):
        from starlette.responses import JSONResponse

        try:
            self._check_key(request)
        except RequestError as e:
            return self.error_response(e)
        created = int(self.started)
        return JSONResponse({"object": "list", "data": [
            {"id": m, "object": "model", "created": created, "owned_by": "epicode-edge"} for m in self.models]})

    async def chat(self, request):
        return await self._complete(request, "chat")

    async def completions(self, request):
        return await self._complete(request, "completion")

    async def _complete(self, request, kind: str):
        from starlette.responses import JSONResponse, StreamingResponse

        note = request.scope.get(LOG_KEY, {})
        try:
            self._check_key(request)
            req = parse_request(await self._body(request), kind, max_tokens_limit=self.limit,
                                default_max_tokens=self.config.default_max_tokens)
            note["model"] = req["model"]
            if req["model"] is not None and req["model"] not in self.models:
                raise RequestError(404, f"the model {_shown(req['model'])} does not exist here: this server serves "
                                        f"{self.models[0]!r} (EpiCoDe) and {self.models[1]!r} (the finetuned model "
                                        "alone)", "model", code="model_not_found")
            job = self._job(req)
            sched = self.scheduler(req["finetuned"])
            try:
                sched.submit(job)
            except Busy:
                raise RequestError(429, f"the server is busy ({self.config.parallel} requests decoding, "
                                        f"{self.config.max_queue} waiting): retry later", kind="server_busy",
                                   headers={"Retry-After": "1"}) from None
            except RuntimeError as e:
                raise RequestError(503, str(e), kind="server_error") from None
        except RequestError as e:
            note["outcome"] = e.message[:160]
            return self.error_response(e)
        except ClientGone:
            note["outcome"] = "client left while sending"
            return JSONResponse({}, status_code=499)
        meta = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "created": int(time.time()), "model": req["model"] or self.config.name}
        note["id"] = meta["id"]
        note["model"] = meta["model"]
        note["prompt_tokens"] = len(job.ids)
        if req["stream"]:
            return StreamingResponse(self._sse(request, sched, job, kind, meta, req["include_usage"], note,
                                               req["explain"], req["logprobs"]),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        tokens: list = []
        res = await self._wait(request, sched, job, tokens)
        if isinstance(res, RequestError):
            note["outcome"] = res.message[:160]
            return self.error_response(res)
        if res is None:  # the client went away
            note["outcome"] = "cancelled: the client left"
            return JSONResponse({}, status_code=499)
        note["completion_tokens"] = res.completion_tokens
        choice = {"index": 0, "finish_reason": res.finish_reason}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": res.text}
            if req["logprobs"]:
                choice["logprobs"] = {"content": [openai_logprob(ev.explain, self.rt.expert) for ev in tokens]}
        else:
            choice.update(text=res.text, logprobs=None)
        extras = _extras(res, job)
        if req["explain"]:
            extras.update(tokens=[explain_json(ev.explain, self.rt.expert, ev.text) for ev in tokens],
                          stats=_stats(res))
        return JSONResponse({**meta, "object": "chat.completion" if kind == "chat" else "text_completion",
                             "choices": [choice], "usage": _usage(res), "epicode": extras})

    def _job(self, req: dict) -> Job:
        rt = self.rt
        try:
            settings = rt.settings(**req["settings"])
            ids = rt.encode(req["input"], raw=isinstance(req["input"], str))  # completions: the prompt as is
        except (ParameterError, InputError, UnsupportedError, ContextFullError) as e:
            raise RequestError(400, one_line(e), None) from None
        except EpicodeError as e:
            raise _as_error(e) from None
        if len(ids) >= self.n_ctx:
            raise RequestError(400, f"the prompt has {len(ids)} tokens, more than fits the context of {self.n_ctx} "
                                    f"(shorten it; the server never cuts a prompt)", "messages" if
                               isinstance(req["input"], list) else "prompt", kind="context_length_exceeded")
        return Job(next(self._ids), ids, settings, asyncio.get_running_loop())

    async def _wait(self, request, sched: Scheduler, job: Job, tokens: list | None = None):
        """The job's Result (text events dropped, token events appended to tokens); None when the client went
        away (the job is cancelled)."""
        while True:
            try:
                what, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    sched.cancel(job)
                    return None
                continue
            if what == "token" and tokens is not None:
                tokens.append(value)
            if what == "done":
                return _as_error(value) if isinstance(value, BaseException) else value

    async def _sse(self, request, sched: Scheduler, job: Job, kind: str, meta: dict, include_usage: bool,
                   note: dict, explain: bool = False, logprobs: bool = False):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        vocab = self.rt.expert

        def chunk(text=None, finish=None, role=False, usage=None, token=None, extras=None):
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else (
                    {"content": text} if text or token is not None else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                if token is not None and logprobs:
                    choice["logprobs"] = {"content": [openai_logprob(token.explain, vocab)]}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            d = {**meta, "object": obj, "choices": [] if usage else [choice]}
            if usage:
                d["usage"] = usage
            if token is not None and explain:
                d["epicode"] = {"tokens": [explain_json(token.explain, vocab, token.text)]}
            if extras is not None:
                d["epicode"] = extras
            return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"

        sent = []
        done = False
        try:
            if kind == "chat":
                yield chunk(role=True)
            while True:
                what, value = await job.events.get()
                if what == "text":
                    sent.append(value)
                    yield chunk(text=value)
                    continue
                if what == "token":
                    sent.append(value.text)
                    yield chunk(text=value.text, token=value)
                    continue
                done = True
                if isinstance(value, BaseException):
                    err = _as_error(value)
                    note["outcome"] = f"failed in the stream: {err.status} {err.kind}"
                    yield "data: " + json.dumps({"error": {"message": err.message, "type": err.kind}}) + "\n\n"
                else:
                    note["completion_tokens"] = value.completion_tokens
                    tail = value.text[len("".join(sent)):]
                    if tail:
                        yield chunk(text=tail)
                    yield chunk(finish=value.finish_reason,
                                extras={**_extras(value, job), "stats": _stats(value)} if explain else None)
                    if include_usage:
                        yield chunk(usage=_usage(value))
                yield "data: [DONE]\n\n"
                return
        finally:
            if not done:  # the client went away mid-stream: free the slot now
                note["outcome"] = "cancelled: the client left"
                sched.cancel(job)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _usage(res) -> dict:
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
            "total_tokens": res.prompt_tokens + res.completion_tokens}


def _extras(res, job: Job) -> dict:
    out = {"stopped_by": res.stopped_by, "changed_tokens": res.changed_tokens,
           "lambda": job.settings.lam, "alpha": job.settings.alpha}
    if res.stats.constraint_complete is not None:  # false: max_tokens cut the answer before the constraint's end
        out["constraint_complete"] = res.stats.constraint_complete
    return out


def _stats(res) -> dict:
    """A request's counts and speed for the page's summary (loop.Stats)."""
    st = res.stats
    return {"completion_tokens": st.completion_tokens, "picks": st.picks, "changed": st.changed,
            "amateur_skipped": st.amateur_skipped, "tokens_per_s": st.tokens_per_s, "ttft_s": st.ttft_s,
            "decode_s": st.decode_s}


def _as_error(e: BaseException) -> RequestError:
    """A request's failure as the client sees it, by the error's class: what the request asked for (a parameter,
    its input, a prompt that does not fit) is 400; everything else - NaN logits from broken weights, an engine
    that fails - is the server's own failure, 500 server_error."""
    if isinstance(e, ContextFullError):
        return RequestError(400, one_line(e), kind="context_length_exceeded")
    if isinstance(e, (ParameterError, InputError)):
        return RequestError(400, one_line(e))
    return RequestError(500, f"the server failed on this request: {one_line(e)}" if isinstance(e, EpicodeError)
                        else f"the server failed on this request: {type(e).__name__}: {one_line(e)}",
                        kind="server_error")


# ----------------------------------------------------------------------------------------------
# the app: routes, JSON errors for unknown paths and methods, one log line per request
# ----------------------------------------------------------------------------------------------

# The chat page may talk to this server only: no script, style, image or connection from another address.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                                           "form-action 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

LOG_KEY = "epicode.request"  # the scope entry where a handler notes the request's id, model and tokens


class RequestLog:
    """ASGI middleware: one line per HTTP request on the module's logger (id, model, tokens, time, status),
    written when the response is complete (for a stream: when it ends or the client leaves)."""

    def __init__(self, app):
        self.app = app
        self._n = itertools.count(1)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        note: dict = {}
        scope[LOG_KEY] = note
        status = [None]
        t0 = time.perf_counter()

        async def send_(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_)
        finally:
            fields_ = [f"request {note.get('id') or 'req-%d' % next(self._n)}", f"{scope['method']} {scope['path']}",
                       f"status {status[0] if status[0] is not None else 'none'}"]
            if note.get("model") is not None:
                fields_.append(f"model {_shown(note['model'])}")
            if "prompt_tokens" in note:
                fields_.append(f"tokens {note['prompt_tokens']}+{note.get('completion_tokens', 0)}")
            fields_.append(f"{time.perf_counter() - t0:.3f} s")
            if note.get("outcome"):
                fields_.append(note["outcome"])
            log.info(" | ".join(fields_))


def create_app(runtime, config: ServeConfig | None = None, start: bool = True):
    """The Starlette app serving `runtime`. start=True opens both models' slots now (Server.start: an
    EpicodeError when they do not fit); they close when the app's lifespan ends (or with app.state.server)."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.routing import Route

    server = Server(runtime, config or ServeConfig())
    if start:
        server.start()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        _quiet_accept_errors(asyncio.get_running_loop())
        try:
            yield
        finally:
            server.close()

    routes = [
        Route("/", server.page, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/v1/models", server.models_list, methods=["GET"]),
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
    ]
    paths = ", ".join(f"{'/'.join(sorted(r.methods - {'HEAD'}))} {r.path}" for r in routes)

    async def http_error(request, exc):
        if exc.status_code == 405:
            allowed = next((r.methods for r in routes if r.path == request.url.path), set()) - {"HEAD"}
            e = RequestError(405, f"{request.method} is not allowed on {request.url.path} (use "
                                  f"{' or '.join(sorted(allowed))})", headers={"Allow": ", ".join(sorted(allowed))},
                             code="method_not_allowed")
        elif exc.status_code == 404:
            e = RequestError(404, f"no such path {_shown(request.url.path)} (paths: {paths})", code="not_found")
        else:
            e = RequestError(exc.status_code, one_line(Exception(exc.detail)), code=None)
        return Server.error_response(e)

    async def internal_error(request, exc):  # a bug here: JSON for the client (uvicorn logs the traceback)
        return Server.error_response(RequestError(500, f"the server failed on this request: "
                                                       f"{type(exc).__name__}", kind="server_error"))

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: internal_error},
                    middleware=[Middleware(RequestLog)])
    app.state.server = server
    return app


# ----------------------------------------------------------------------------------------------
# the connection layer: read timeouts, a connection limit, a shutdown that does not wait on idle clients
# ----------------------------------------------------------------------------------------------


class _Guard:
    """State shared by one server's connections: those still sending their request (oldest first)."""

    def __init__(self, max_connections: int, read_timeout: float):
        self.max_connections, self.read_timeout = max_connections, read_timeout
        self.reading: dict = {}  # protocol -> None, in the order they started waiting (a dict keeps it)
        self.dropped = 0         # connections closed to make room
        self.refused = 0         # connections refused: all the others were busy with requests
        self._said = 0.0

    def say_once(self, message: str, *args) -> None:
        """A warning at most once a minute (a flood of refusals must not flood the log)."""
        now = time.monotonic()
        if now - self._said >= 60:
            self._said = now
            log.warning(message, *args)


_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
         b"retry-after: 1\r\ncontent-length: %d\r\n\r\n%s")
_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s")


def _raw_error(template: bytes, message: str, kind: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()
    return template % (len(body), body)


def guarded_protocol(config: ServeConfig):
    """uvicorn's h11 protocol with what it lacks against idle and slow clients (a class per server):

    - a connection must send its request headers within read_timeout (from connect, and again after each
      answer while it is kept alive); otherwise it is closed (a 408 when it had sent part of a request);
    - at most max_connections are open; a new one beyond closes the oldest connection still sending its
      request (or, when every other one is busy with an answer, is itself refused with a 503);
    - on shutdown, a connection whose request never arrived whole is closed at once instead of waited for.
    The body's own timeout and size limit are in Server._body."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    guard = _Guard(config.max_connections, config.read_timeout)

    class GuardedH11Protocol(H11Protocol):
        guard_state = guard

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._timer = None
            self._waiting_for = None
            self._got = False
            if len(self.connections) > guard.max_connections:
                victim = next((c for c in guard.reading if c is not self), None)
                if victim is None:
                    guard.refused += 1
                    guard.say_once("%d connections open (--max-connections), all busy with requests: new ones are "
                                   "refused with 503 (said once a minute)", len(self.connections) - 1)
                    transport.write(_raw_error(_BUSY, f"the server has {guard.max_connections} connections open, "
                                                      "all busy: retry later", "server_busy"))
                    transport.close()
                    return
                guard.dropped += 1
                guard.say_once("%d connections open (--max-connections): dropping the oldest ones still sending "
                               "their request to make room (said once a minute)", guard.max_connections)
                victim._drop()
            self._wait_for_request()

        # -- the request-reading window ---------------------------------------------------------
        def _wait_for_request(self) -> None:
            self._stop_waiting()
            self._waiting_for = self.cycle  # reading ends when a new cycle (request) starts
            self._got = False
            guard.reading[self] = None
            self._timer = self.loop.call_later(guard.read_timeout, self._read_timed_out)

        def _stop_waiting(self) -> None:
            guard.reading.pop(self, None)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _read_timed_out(self) -> None:
            self._timer = None
            guard.reading.pop(self, None)
            if self.transport.is_closing():
                return
            if self._got:
                self.transport.write(_raw_error(_TIMEOUT, f"the request headers did not arrive whole within "
                                                          f"{guard.read_timeout:g} s", "invalid_request_error"))
            self.transport.close()

        def _drop(self) -> None:
            self._stop_waiting()
            if not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            self._got = True
            super().data_received(data)
            if self in guard.reading and self.cycle is not self._waiting_for:
                self._stop_waiting()  # the request's headers arrived (its body has its own timeout)

        def on_response_complete(self) -> None:
            cycle = self.cycle
            super().on_response_complete()
            if not self.transport.is_closing() and self.cycle is cycle:  # no pipelined request started
                self._wait_for_request()

        def connection_lost(self, exc) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

        def shutdown(self) -> None:
            c = self.cycle
            if c is not None and not c.response_started and c.more_body:
                self.transport.close()  # its request never arrived whole: there is nothing to answer
                return
            super().shutdown()

    return GuardedH11Protocol


def _quiet_accept_errors(loop) -> None:
    """asyncio reports every failed accept (out of descriptors: EMFILE) with a traceback: say it once a minute."""
    previous = loop.get_exception_handler()
    said = [0.0, 0]

    def handler(loop, context):
        if said[1] and isinstance(context.get("exception"), ValueError) and \
                "_start_serving" in repr(context.get("handle")):
            return  # asyncio's retry of a failed accept, run after the listening socket closed at shutdown
        if str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            said[1] += 1
            now = time.monotonic()
            if now - said[0] >= 60:
                said[0] = now
                log.warning("cannot accept connections: %s (%d times; lower --max-connections or raise the "
                            "descriptor limit, ulimit -n; said once a minute)", context.get("exception"), said[1])
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def descriptor_room(reserve: int = 32) -> int | None:
    """File descriptors this process may still open, less a reserve (None where it cannot be told)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        used = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0
    except (ImportError, OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    return max(1, soft - used - reserve)


BACKLOG = 64  # connections the kernel queues, and asyncio accepts in one go


@dataclass
class Served:
    """A bound, not yet running server: run() blocks until SIGINT/SIGTERM (or server.should_exit)."""
    app: Any
    server: Any          # uvicorn.Server
    sock: Any            # the listening socket
    host: str
    port: int            # the port it got (also with port 0)
    notes: list

    @property
    def url(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{h}:{self.port}"

    def run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.sock.close()


def make_server(runtime, config: ServeConfig | None = None, host: str = "127.0.0.1", port: int = 8080,
                log_level: str = "warning") -> Served:
    """The app (its slots opened: an EpicodeError when they do not fit), a socket bound to host:port (port 0:
    a free one, in Served.port) and the uvicorn server with the guarded protocol. max_connections is lowered
    to the file descriptors this process can still open (a note says so)."""
    import socket

    import uvicorn

    config = config or ServeConfig()
    config.check()
    notes = []
    room = descriptor_room()
    # asyncio accepts up to `backlog` connections at a time, and a few such bursts can land before the
    # connections dropped to make room are closed: keep room for them below the descriptor limit
    backlog = BACKLOG
    if room is not None and config.max_connections > room - 3 * backlog:
        limit = max(1, room - 3 * backlog)
        notes.append(f"max_connections lowered from {config.max_connections} to {limit}: the process may open only "
                     f"{room} more files (ulimit -n), and new connections arrive {backlog} at a time")
        config = _replace(config, max_connections=limit)
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
    except OSError as e:
        raise ParameterError(f"serve: cannot listen on {host}:{port} ({e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(backlog)
        sock.set_inheritable(True)
    except OSError as e:
        sock.close()
        raise ParameterError(f"serve: cannot listen on {host}:{port} ({e.strerror or e})") from None
    try:
        app = create_app(runtime, config)
    except BaseException:
        sock.close()
        raise
    ucfg = uvicorn.Config(app, host=host, port=port, http=guarded_protocol(config), log_level=log_level,
                          lifespan="on", timeout_keep_alive=min(5, config.read_timeout), backlog=backlog,
                          timeout_graceful_shutdown=config.shutdown_timeout,
                          h11_max_incomplete_event_size=64 * 1024)
    return Served(app, uvicorn.Server(ucfg), sock, host, sock.getsockname()[1], notes)


def _replace(config: ServeConfig, **kw) -> ServeConfig:
    from dataclasses import replace

    return replace(config, **kw)
