"""`serve`: an OpenAI-compatible HTTP server over one bundle, on localhost (Starlette, run by uvicorn).

    app = create_app(runtime, ServeConfig(parallel=4, api_key=None, name="my-bundle"))
    uvicorn.run(app, host="127.0.0.1", port=8080)

    client = openai.OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")
    client.chat.completions.create(model="my-bundle", messages=[...], extra_body={"lambda": 1.0})

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions, streaming
(server-sent events ending with `data: [DONE]`) or not. Two models: NAME (EpiCoDe) and NAME:finetuned (the
finetuned model alone, for comparison). EpiCoDe's own settings come as extra body fields: `lambda`, `alpha`
(and llama-server's `top_k`, `min_p`, `repetition_penalty`).

Concurrent requests are decoded together: one decoding thread per model over Runtime.stream_many (continuous
batching over `parallel` slots); beyond the slots a queue of `max_queue`, beyond that 429 with Retry-After.
A client that goes away frees its slot at once. Every bad request gets a status and a one-line message in
OpenAI's error shape; it never touches the others.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import EpicodeError
from ..runtime import IDLE, Cancelled, check_messages

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


class RequestError(Exception):
    """A request the server refuses: HTTP status, one-line message, the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


# ----------------------------------------------------------------------------------------------
# request parsing (pure)
# ----------------------------------------------------------------------------------------------


def _number(body, name, lo=None, hi=None, integer=False):
    v = body.get(name)
    if v is None:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool):
        raise RequestError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {v!r}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RequestError(400, f"'{name}' must be between {lo} and {hi}, got {v!r}", name)
    return v


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
    out["include_usage"] = bool((so or {}).get("include_usage"))
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if mt is None:
        mt = min(default_max_tokens, max_tokens_limit)
    elif not isinstance(mt, int) or isinstance(mt, bool) or mt < 0:
        raise RequestError(400, f"'{name}' must be an integer >= 0, got {mt!r}", name)
    elif mt > max_tokens_limit:
        raise RequestError(400, f"'{name}' is {mt}, more than this server's limit of {max_tokens_limit}", name)
    s: dict = {"max_tokens": mt}
    for field_, key, lo, hi, integer in (("temperature", "temp", 0, 2, False), ("top_p", "top_p", 0, 1, False),
                                         ("top_k", "top_k", 0, None, True), ("min_p", "min_p", 0, 1, False),
                                         ("seed", "seed", None, None, True), ("lambda", "lam", 0, None, False),
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
    out["settings"] = s
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
        self.error: BaseException | None = None
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

    def _source(self):
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
            for job in jobs:
                self._finish(job, e)

    def _is_cancelled(self, key) -> bool:
        job = self._jobs.get(key)
        return job is None or job.cancelled

    def _on_event(self, key, ev) -> None:
        job = self._jobs.get(key)
        if job is not None and ev.text:
            job.put(("text", ev.text))

    def _finish(self, job: Job, res) -> None:
        with self._lock:
            self._jobs.pop(job.key, None)
            self.counts["cancelled" if isinstance(res, Cancelled) else
                        "failed" if isinstance(res, BaseException) else "completed"] += 1
        job.put(("done", res))


# ----------------------------------------------------------------------------------------------
# the HTTP layer
# ----------------------------------------------------------------------------------------------


class Server:
    def __init__(self, runtime, config: ServeConfig):
        self.rt, self.config = runtime, config
        self.n_ctx = runtime.expert.n_ctx
        self.limit = min(config.max_tokens_limit or self.n_ctx, self.n_ctx)
        self._schedulers: dict[bool, Scheduler] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.started = time.time()

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
        if self.config.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.config.api_key.encode()):
            raise RequestError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                               kind="invalid_api_key")

    async def _body(self, request) -> Any:
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise RequestError(413, f"request body larger than {limit} bytes")
        raw = await request.body()
        if len(raw) > limit:
            raise RequestError(413, f"request body larger than {limit} bytes")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise RequestError(400, f"the request body is not valid JSON ({' '.join(str(e).split())[:120]})") \
                from None

    @staticmethod
    def error_response(e: RequestError):
        from starlette.responses import JSONResponse

        return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}},
                            status_code=e.status, headers=e.headers)

    # -- endpoints ---------------------------------------------------------------------------------
    async def health(self, request):
        from starlette.responses import JSONResponse

        per = {("finetuned" if k else "epicode"): {"in_flight": s.in_flight, **s.counts}
               for k, s in self._schedulers.items()}
        return JSONResponse({"status": "ok", "model": self.config.name, "parallel": self.config.parallel,
                             "schedulers": per})

    async def models(self, request):
        from starlette.responses import JSONResponse

        try:
            self._check_key(request)
        except RequestError as e:
            return self.error_response(e)
        created = int(self.started)
        return JSONResponse({"object": "list", "data": [
            {"id": self.config.name, "object": "model", "created": created, "owned_by": "epicode-edge"},
            {"id": self.config.name + FINETUNED_SUFFIX, "object": "model", "created": created,
             "owned_by": "epicode-edge"}]})

    async def chat(self, request):
        return await self._complete(request, "chat")

    async def completions(self, request):
        return await self._complete(request, "completion")

    async def _complete(self, request, kind: str):
        from starlette.responses import JSONResponse, StreamingResponse

        try:
            self._check_key(request)
            req = parse_request(await self._body(request), kind, max_tokens_limit=self.limit,
                                default_max_tokens=self.config.default_max_tokens)
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
            return self.error_response(e)
        meta = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "created": int(time.time()), "model": req["model"] or self.config.name}
        if req["stream"]:
            return StreamingResponse(self._sse(request, sched, job, kind, meta, req["include_usage"]),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        res = await self._wait(request, sched, job)
        if isinstance(res, RequestError):
            return self.error_response(res)
        if res is None:  # the client went away
            return JSONResponse({}, status_code=499)
        choice = {"index": 0, "finish_reason": res.finish_reason}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": res.text}
        else:
            choice.update(text=res.text, logprobs=None)
        return JSONResponse({**meta, "object": "chat.completion" if kind == "chat" else "text_completion",
                             "choices": [choice], "usage": _usage(res), "epicode": _extras(res, job)})

    def _job(self, req: dict) -> Job:
        rt = self.rt
        try:
            settings = rt.settings(**req["settings"])
            ids = rt.encode(req["input"], raw=isinstance(req["input"], str))  # completions: the prompt as is
        except EpicodeError as e:
            raise RequestError(400, " ".join(str(e).split()), None) from None
        if len(ids) >= self.n_ctx:
            raise RequestError(400, f"the prompt has {len(ids)} tokens, more than fits the context of {self.n_ctx} "
                                    f"(shorten it; the server never cuts a prompt)", "messages" if
                               isinstance(req["input"], list) else "prompt", kind="context_length_exceeded")
        return Job(next(self._ids), ids, settings, asyncio.get_running_loop())

    async def _wait(self, request, sched: Scheduler, job: Job):
        """The job's Result (text events dropped); None when the client went away (the job is cancelled)."""
        while True:
            try:
                what, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    sched.cancel(job)
                    return None
                continue
            if what == "done":
                return _as_error(value) if isinstance(value, BaseException) else value

    async def _sse(self, request, sched: Scheduler, job: Job, kind: str, meta: dict, include_usage: bool):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(text=None, finish=None, role=False, usage=None):
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            d = {**meta, "object": obj, "choices": [] if usage else [choice]}
            if usage:
                d["usage"] = usage
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
                done = True
                if isinstance(value, BaseException):
                    err = _as_error(value)
                    yield "data: " + json.dumps({"error": {"message": err.message, "type": err.kind}}) + "\n\n"
                else:
                    tail = value.text[len("".join(sent)):]
                    if tail:
                        yield chunk(text=tail)
                    yield chunk(finish=value.finish_reason)
                    if include_usage:
                        yield chunk(usage=_usage(value))
                yield "data: [DONE]\n\n"
                return
        finally:
            if not done:  # the client went away mid-stream: free the slot now
                sched.cancel(job)


def _usage(res) -> dict:
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
            "total_tokens": res.prompt_tokens + res.completion_tokens}


def _extras(res, job: Job) -> dict:
    return {"stopped_by": res.stopped_by, "changed_tokens": res.changed_tokens,
            "lambda": job.settings.lam, "alpha": job.settings.alpha}


def _as_error(e: BaseException) -> RequestError:
    if isinstance(e, EpicodeError):
        return RequestError(400, " ".join(str(e).split()))
    return RequestError(500, f"{type(e).__name__}: {' '.join(str(e).split())}", kind="server_error")


def create_app(runtime, config: ServeConfig | None = None):
    """The Starlette app serving `runtime` (its decoding threads start with the first request)."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.routing import Route

    server = Server(runtime, config or ServeConfig())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.close()

    app = Starlette(routes=[
        Route("/health", server.health),
        Route("/v1/models", server.models),
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
    ], lifespan=lifespan)
    app.state.server = server
    return app
