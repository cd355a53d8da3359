"""The JSONL batch runner: one request per input line, one result record per output line.

    summary = run_batch(runtime, "in.jsonl", "out.jsonl", compare=False, parallel=8, max_tokens=128)
    results = generate_batch(runtime, ["prompt 1", "prompt 2"], parallel=8, max_tokens=64)   # Python API

Input lines are `{"id": ..., "prompt": "..."}` or `{"id": ..., "messages": [{"role", "content"}, ...]}`
with optional per-line overrides of the defaults: max_tokens, lambda, alpha, temp, top_p, top_k, min_p,
seed, stop, system, response_format (structured output: {"type": "json_object"}, {"type": "json_schema",
"json_schema": {"schema": {...}}}, {"type": "regex", "regex": "..."}, {"type": "grammar", "grammar": "..."},
{"type": "text"} for none). Blank lines are ignored; any other key is an error (it catches typos like
"temperature").

Output records (one JSON object per line, UTF-8):
    {"id", "line", "text", "finish_reason", "prompt_tokens", "completion_tokens", "changed_tokens",
     "timings"[, "finetuned_text"][, "constraint_complete"]}
                                                  a request that ran (finetuned_text with compare=True;
                                                  constraint_complete with a response_format: false when
                                                  max_tokens cut the answer before the constraint's end)
    {"id", "line", "error"}                       a malformed line or a failed request (id null when the
                                                  line has none; `line` is the 1-based input line)

Order: records are appended in completion order. Run one at a time (parallel=1) that is input order;
with parallel > 1 requests finish out of order, so sort by "line" to restore input order.

Batched decoding (parallel > 1): up to `parallel` requests are decoded together, one multi-sequence
llama_decode (llama.cpp) or one batched forward (MLX) per model per step (decoding/batch_loop.py,
backends/multiseq.py); requests finish independently and the next ones take the freed slots. Greedy
outputs are those of one request at a time, up to float rounding of the batched kernels. `generate_batch(runtime, prompts, parallel=8)` is
the same for the Python API. With compare=True the finetuned-alone answer is computed one at a time.

Durability and resume: each record is written and flushed as its request finishes. A rerun with the
same output skips every request whose id (or, for a line without id, whose line number) already has a
record, so after any number of interrupted runs each id appears exactly once. A crash can leave a
truncated last line: it is cut off before appending (complete records are never touched). Error records
count as done unless retry_errors=True, which drops them from the output (atomic rewrite; a symlinked
output is rewritten through its link) and runs those requests again. Only a last line that is the start of
a record is cut; an output holding anything else (other JSON, text, binary) is refused and left as it was.
Input lines longer than MAX_LINE_BYTES and outputs that are not regular files are refused. Duplicate
ids in the input: the first occurrence runs, later ones are reported in Summary.duplicates and skipped.

Library code: never prints; progress is a callback progress(done, total, record_or_None).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..decoding.constraint import parse_constraint
from ..errors import EpicodeError, InputError, one_line

# JSON field -> Python keyword of Runtime.generate / Runtime.stream
OVERRIDES = {
    "max_tokens": "max_tokens", "lambda": "lam", "alpha": "alpha", "temp": "temp", "top_p": "top_p",
    "top_k": "top_k", "min_p": "min_p", "seed": "seed", "stop": "stop", "system": "system",
    "response_format": "constraint",  # structured output (decoding/constraint.py), OpenAI's shape
}
_NUMBER = (int, float)
_TYPES = {  # JSON field -> (accepted Python types, description)
    "max_tokens": ((int,), "an integer"), "lambda": (_NUMBER, "a number"), "alpha": (_NUMBER, "a number"),
    "temp": (_NUMBER, "a number"), "top_p": (_NUMBER, "a number"), "top_k": ((int,), "an integer"),
    "min_p": (_NUMBER, "a number"), "seed": ((int,), "an integer"), "stop": ((str, list), "a string or a list"),
    "system": ((str,), "a string"), "response_format": ((dict,), "an object"),
}
_ROLES = ("system", "user", "assistant")

Progress = Callable[[int, int, "dict | None"], None]


@dataclass
class Request:
    """One parsed input line."""

    id: Any
    line: int
    prompt: str | None = None  # (exactly one of prompt / messages)
    messages: list[dict] | None = None
    settings: dict = field(default_factory=dict)  # Python keywords (lam, not lambda)

    @property
    def key(self) -> str:
        return _key(self.id, self.line)


@dataclass
class Job:
    """What a run has to do, worked out before any model is loaded (so bad paths fail fast)."""

    input_path: Path
    output_path: Path
    total: int  # requests and bad lines in the input, duplicates excluded
    pending: list  # Request or error record (dict), input order
    skipped: int  # already done in the output
    duplicates: list[tuple[Any, int, int]]  # (id, line, line of its first occurrence)
    repaired: str | None = None  # what was fixed in the output, if anything
    out: "_Output | None" = field(default=None, repr=False)  # the output, open and locked until close()

    def close(self) -> None:
        """Release the output's lock (an output this job created and never wrote to is removed)."""
        if self.out is not None:
            self.out.close()
            self.out = None

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Output:
    """The results file, opened once and locked (flock) for one writer: a second run on the same output is
    refused instead of writing every record twice. Records are appended with os.write; a write that fails
    (a full disk) is cut off again, so the file stays a list of complete records and a rerun resumes."""

    def __init__(self, path: Path):
        self.path = path
        self.created = not path.exists()
        self.fd = None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise InputError(f"cannot write {path}: {e.strerror or e}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # check_output saw a file; it was replaced since
                raise InputError(f"cannot write {path}: not a regular file")
            _lock(fd, path)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.written = 0

    def replace_with(self, fd: int) -> None:
        """After an atomic rewrite: fd (already locked) is the file now at path."""
        os.close(self.fd)
        self.fd = fd

    def append(self, data: bytes) -> None:
        pos = os.lseek(self.fd, 0, os.SEEK_END)
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as e:
            try:
                os.ftruncate(self.fd, pos)  # no partial record left behind
            except OSError:
                pass
            full = e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EFBIG)
            why = "no space left on the device" if full else (e.strerror or str(e))
            raise InputError(f"cannot write {self.path}: {why} ({self.written} records written by this run, "
                             f"{len(data)} bytes needed for the next; free some space and run the same command "
                             "again to resume)") from None
        self.written += 1

    def __del__(self):  # a Job dropped without close() releases the lock too
        self.close()

    def close(self) -> None:
        if self.fd is None:
            return
        try:
            if self.created and os.fstat(self.fd).st_size == 0:
                self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _lock(fd: int, path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise InputError(f"cannot write {path}: another batch run is writing to it (wait for it to finish, or "
                         "choose another output file)") from None


@dataclass
class Summary:
    n_ok: int = 0
    n_errors: int = 0
    n_skipped: int = 0
    duplicates: list = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    output_path: Path | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        parts = [f"{self.n_ok} ok", f"{self.n_errors} errors"]
        if self.n_skipped:
            parts.append(f"{self.n_skipped} already done")
        if self.duplicates:
            parts.append(f"{len(self.duplicates)} duplicate ids skipped")
        parts.append(f"{self.completion_tokens} tokens in {self.seconds:.1f} s ({self.tokens_per_s:.1f} tok/s)")
        return ", ".join(parts) + (f" -> {self.output_path}" if self.output_path else "")


def _key(id_: Any, line: int) -> str:
    """Identity of a request across runs: its id, or its line number when it has none."""
    return "id:" + json.dumps(id_, sort_keys=True) if id_ is not None else f"line:{line}"


# ---------------------------------------------------------------------------------------------
# input
# ---------------------------------------------------------------------------------------------


MAX_LINE_BYTES = 1 << 20  # the longest input line read (1 MiB): a file without newlines (/dev/zero) stops here


def read_input(path: Path) -> bytes:
    """The input's bytes, read a line at a time: a line longer than MAX_LINE_BYTES is refused as soon as it
    is seen, so that a huge or endless line never fills the memory."""
    path = Path(path)
    chunks = []
    try:
        with open(path, "rb") as f:
            for n, line in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
                if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):  # (readline's cap: no newline in it)
                    raise InputError(f"cannot read {path}: line {n} is longer than {MAX_LINE_BYTES} bytes (the "
                                     "limit per input line)")
                chunks.append(line)
    except FileNotFoundError:
        raise InputError(f"cannot read {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"cannot read {path}: it is a directory") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    return b"".join(chunks)


def parse_line(raw: bytes, line: int) -> Request | dict | None:
    """One input line -> a Request, an error record, or None for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return _error(None, line, f"line {line}: not UTF-8 ({e.reason} at byte {e.start})")
    text = text.strip().lstrip("\ufeff")
    if not text:
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return _error(None, line, f"line {line}: not valid JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        return _error(None, line, f"line {line}: JSON nested too deeply")
    if not isinstance(obj, dict):
        return _error(None, line, f"line {line}: expected a JSON object, got {type(obj).__name__}")
    id_ = obj.get("id")
    try:
        return _request(obj, line)
    except InputError as e:
        return _error(id_ if _valid_id(id_) else None, line, str(e))


def _valid_id(id_: Any) -> bool:
    return isinstance(id_, (str, int)) and not isinstance(id_, bool)


def _request(obj: dict, line: int) -> Request:
    where = f"line {line}"
    if "id" not in obj:
        raise InputError(f"{where}: missing field 'id'")
    id_ = obj["id"]
    if not _valid_id(id_):
        raise InputError(f"{where}: field 'id' must be a string or an integer")
    unknown = sorted(set(obj) - {"id", "prompt", "messages"} - set(OVERRIDES))
    if unknown:
        raise InputError(f"{where}: unknown field {unknown[0]!r} (allowed: id, prompt, messages, "
                         f"{', '.join(OVERRIDES)})")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise InputError(f"{where}: give exactly one of 'prompt' or 'messages'")
    req = Request(id=id_, line=line)
    if has_prompt:
        if not isinstance(obj["prompt"], str):
            raise InputError(f"{where}: field 'prompt' must be a string")
        req.prompt = obj["prompt"]
    else:
        req.messages = _messages(obj["messages"], where)
    for name, py in OVERRIDES.items():
        if name in obj:
            req.settings[py] = _override(name, obj[name], where)
    return req


def _messages(msgs: Any, where: str) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise InputError(f"{where}: field 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in _ROLES:
            raise InputError(f"{where}: messages[{i}] must be {{\"role\": system|user|assistant, "
                             f"\"content\": string}}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _override(name: str, value: Any, where: str) -> Any:
    types, what = _TYPES[name]
    if isinstance(value, bool) or not isinstance(value, types):
        raise InputError(f"{where}: field {name!r} must be {what}")
    if name == "stop" and isinstance(value, list) and not all(isinstance(s, str) for s in value):
        raise InputError(f"{where}: field 'stop' must be a string or a list of strings")
    if name == "response_format":  # checked here; kept as the object (it travels as JSON to Ray workers)
        parse_constraint(value, f"{where}: response_format")
    return value


def _error(id_: Any, line: int, message: str) -> dict:
    return {"id": id_, "line": line, "error": message}


def parse_input(data: bytes) -> tuple[list, list[tuple[Any, int, int]]]:
    """All lines -> (items in input order: Request or error record, duplicates (id, line, first line))."""
    items, first, dups = [], {}, []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        item = parse_line(raw, n)
        if item is None:
            continue
        id_ = item.id if isinstance(item, Request) else item["id"]
        if id_ is not None:
            k = _key(id_, n)
            if k in first:
                dups.append((id_, n, first[k]))
                continue
            first[k] = n
        items.append(item)
    return items, dups


# ---------------------------------------------------------------------------------------------
# output: repair, resume
# ---------------------------------------------------------------------------------------------


def check_output(path: Path, input_path: Path) -> None:
    """Fail early (before loading models) when the output cannot be written."""
    path = Path(path)
    if path.resolve() == Path(input_path).resolve():
        raise InputError(f"cannot write {path}: it is the input file")
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a directory")
    if path.exists() and not path.is_file():  # /dev/full, /dev/zero, a FIFO: no records to resume, no end
        raise InputError(f"cannot write {path}: not a regular file (give a file path, new or a results file)")
    parent = path.parent
    if not parent.exists():
        raise InputError(f"cannot write {path}: no such directory {parent}")
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: {parent} is not a directory")
    target = path if path.exists() else parent
    if not os.access(target, os.W_OK):
        raise InputError(f"cannot write {path}: permission denied")


def scan_output(path: Path) -> tuple[list[dict], int | None, bool]:
    """Read an existing output -> (complete records, byte offset to cut a truncated tail at or None,
    whether the last complete record lacks its newline). Only a last line that is the start of one of our
    records (a write cut short: see _cut_short) may be cut; any other line that is not a record means the
    file is not ours: refuse, leaving it as it was."""
    path = Path(path)
    if not path.exists():
        return [], None, False
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    records, pos, lines = [], 0, data.split(b"\n")
    for n, raw in enumerate(lines, start=1):
        last = n == len(lines)
        rec = _record(raw)
        if rec is None and raw.strip():
            if last and _cut_short(raw):  # a crash mid-write: cut it off
                return records, pos, False
            raise InputError(f"{path} line {n} is not a result record of batch; refusing to write to it (left "
                             "as it was; choose another output file)")
        if rec is not None:
            records.append(rec)
        pos += len(raw) + 1
    needs_newline = bool(data) and not data.endswith(b"\n")
    return records, None, needs_newline


def _record(raw: bytes) -> dict | None:
    """A complete line -> the record dumps_record wrote, or None (not JSON, or JSON of another shape)."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(rec, dict) or "id" not in rec or type(rec.get("line")) is not int:
        return None
    return rec if isinstance(rec.get("text"), str) or isinstance(rec.get("error"), str) else None


RECORD_START = b'{"id": '  # how every line dumps_record writes begins (result_record and _error put "id" first)
_WS = r"[ \t\r\n]*"
_CHARS = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*'  # a JSON string's inside
_JSON_TOKEN = re.compile(_WS + r'(?:(?P<s>"' + _CHARS + r'")|(?P<v>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?'
                         r"(?:[eE][+-]?[0-9]+)?(?![0-9.eE])|true|false|null)|(?P<p>[{}\[\],:]))")
_JSON_PARTIAL = re.compile(_WS + r'(?:(?P<s>"' + _CHARS + r"(?:\\(?:u[0-9a-fA-F]{0,3})?)?)"
                           r"|(?P<v>-|-?(?:0|[1-9][0-9]*)(?:\.[0-9]*)?(?:[eE][+-]?)?"
                           r"|t|tr|tru|f|fa|fal|fals|n|nu|nul))?\Z")


def _cut_short(raw: bytes) -> bool:
    """Whether raw is a record that dumps_record began and did not finish: it starts like one (RECORD_START)
    and is valid JSON up to where it stops, unfinished (UTF-8, maybe cut inside a character; every string
    closed or cut, every number or literal whole or cut). Anything else (other JSON, text, binary) is not."""
    if not (raw.startswith(RECORD_START) or RECORD_START.startswith(raw)):
        return False
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.reason != "unexpected end of data" or e.end != len(raw):
            return False
        text = raw[:e.start].decode("utf-8")
    return _json_prefix(text)


def _json_prefix(text: str) -> bool:
    """Whether text is the beginning of a JSON object, not the whole of one."""
    stack, expect, pos = [], "value", 0  # expect: value, value], key, key}, :, ,]
    while True:
        m = _JSON_TOKEN.match(text, pos)
        if m is None:
            break
        pos, tok = m.end(), m.group(m.lastgroup)
        kind = m.lastgroup
        if kind == "p" and tok in "{[" and expect in ("value", "value]"):
            stack.append(tok)
            expect = "key}" if tok == "{" else "value]"
        elif kind == "p" and tok in "}]" and stack and stack[-1] == ("{" if tok == "}" else "["):
            if expect not in (",]", "key}" if tok == "}" else "value]"):
                return False
            stack.pop()
            expect = ",]" if stack else "end"
        elif kind == "p" and tok == "," and expect == ",]":
            expect = "key" if stack[-1] == "{" else "value"
        elif kind == "p" and tok == ":" and expect == ":":
            expect = "value"
        elif kind == "s" and expect in ("key", "key}"):
            expect = ":"
        elif kind in ("s", "v") and expect in ("value", "value]"):
            expect = ",]" if stack else "end"
        else:
            return False
    rest = _JSON_PARTIAL.match(text, pos)
    if rest is None or expect == "end":
        return False
    if rest.lastgroup == "s":
        return expect in ("value", "value]", "key", "key}")
    return rest.lastgroup is None or expect in ("value", "value]")


def _repair(path: Path, cut: int | None, needs_newline: bool) -> str | None:
    if cut is not None:
        with open(path, "r+b") as f:
            f.truncate(cut)
        return f"dropped a truncated last line of {path}"
    if needs_newline:
        with open(path, "ab") as f:
            f.write(b"\n")
        return f"completed the last line of {path}"
    return None


def _rewrite(path: Path, records: list[dict]) -> int:
    """Replace the output atomically with `records` (a temp file in the same folder, locked, then renamed);
    returns the new file's descriptor, which holds the lock. A symlinked output is rewritten through the
    link: the file it points to is replaced (its temp file made in that file's folder, so the rename stays
    on one file system) and the link stays, as appending through it does."""
    target = Path(os.path.realpath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise InputError(f"cannot rewrite {path}: {e.strerror or e} in {target.parent}") from None
    try:
        _lock(fd, path)
        if hasattr(os, "fchmod"):  # mkstemp makes it 0600; the output keeps the umask's permissions
            os.fchmod(fd, 0o666 & ~_umask())
        data = "".join(dumps_record(rec) for rec in records).encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.replace(tmp, target)
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def dumps_record(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False) + "\n"


def prepare(input_path, output_path, *, retry_errors: bool = False) -> Job:
    """Read and parse the input, check and repair the output, and work out what is left to do."""
    input_path, output_path = Path(input_path), Path(output_path)
    data = read_input(input_path)
    check_output(output_path, input_path)
    items, dups = parse_input(data)
    out = _Output(output_path)  # locked from here: a second run on this output is refused
    try:
        records, cut, needs_newline = scan_output(output_path)
        repaired = _repair(output_path, cut, needs_newline)
        if retry_errors and any("error" in r for r in records):
            records = [r for r in records if "error" not in r]
            out.replace_with(_rewrite(output_path, records))
    except BaseException:
        out.close()
        raise
    done = {_key(r.get("id"), r.get("line", 0)) for r in records}
    pending = [it for it in items if _item_key(it) not in done]
    return Job(input_path, output_path, total=len(items), pending=pending, skipped=len(items) - len(pending),
               duplicates=dups, repaired=repaired, out=out)


def _item_key(item) -> str:
    return item.key if isinstance(item, Request) else _key(item["id"], item["line"])


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------


def run_batch(runtime, input_path, output_path, *, compare: bool = False, progress: Progress | None = None,
              parallel: int = 1, retry_errors: bool = False, **defaults) -> Summary:
    """Run every pending request of input_path through runtime, appending records to output_path."""
    with prepare(input_path, output_path, retry_errors=retry_errors) as job:
        return run_job(runtime, job, compare=compare, progress=progress, parallel=parallel, **defaults)


def run_job(runtime, job: Job, *, compare: bool = False, progress: Progress | None = None,
            parallel: int = 1, **defaults) -> Summary:
    summary = Summary(n_skipped=job.skipped, duplicates=list(job.duplicates), output_path=job.output_path)
    done, total = job.skipped, job.total
    t0 = time.perf_counter()
    if progress:
        progress(done, total, None)
    out = job.out if job.out is not None else _Output(job.output_path)
    from contextlib import closing

    n_requests = sum(isinstance(it, Request) for it in job.pending)
    parallel = max(1, min(parallel, n_requests))  # no more slots (KV caches) than requests
    try:
        with closing(job_records(runtime, job.pending, defaults, compare, parallel)) as records:
            for rec in records:  # (closing: an interrupted run frees the batched contexts at once)
                out.append(dumps_record(rec).encode("utf-8"))
                count_record(summary, rec)
                done += 1
                summary.seconds = time.perf_counter() - t0
                if progress:
                    progress(done, total, rec)
    finally:
        if out is not job.out:
            out.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def count_record(summary: Summary, rec: dict) -> None:
    if "error" in rec:
        summary.n_errors += 1
        return
    summary.n_ok += 1
    summary.prompt_tokens += rec.get("prompt_tokens") or 0
    summary.completion_tokens += rec.get("completion_tokens") or 0


def job_records(runtime, items: list, defaults: dict, compare: bool, parallel: int) -> Iterator[dict]:
    """Records in completion order. Error records of bad lines come out when their line is reached."""
    if parallel > 1 and batched_supported(runtime):
        yield from _batched_records(runtime, items, defaults, compare, parallel)
        return
    for item in items:
        if not isinstance(item, Request):
            yield item
            continue
        yield run_request(runtime, item, defaults, compare)


def _batched_records(runtime, items: list, defaults: dict, compare: bool, parallel: int) -> Iterator[dict]:
    """Several requests decoded together (decoding/batch_loop.py); bad lines and requests that fail before
    decoding (settings, chat template) come out as they are reached."""
    from collections import deque

    side: deque = deque()
    by_key = {}

    def requests():
        for item in items:
            if not isinstance(item, Request):
                side.append(item)
                continue
            messages, settings = request_input(item, defaults)
            try:
                s = runtime.settings(**settings)
                ids = runtime.encode(messages)
            except Exception as e:
                side.append(_failure(item, e))
                continue
            by_key[item.line] = (item, messages, settings)
            yield item.line, ids, s

    for key, res in runtime.stream_many(requests(), parallel=parallel, overlap=defaults.get("overlap")):
        while side:
            yield side.popleft()
        req, messages, settings = by_key.pop(key)
        yield _failure(req, res) if isinstance(res, BaseException) else _finish(runtime, req, res, messages,
                                                                              settings, compare)
    while side:
        yield side.popleft()


def batched_supported(runtime) -> bool:
    """Batched decoding runs on llama.cpp and MLX (backends/multiseq.py)."""
    return getattr(runtime, "backend", None) in ("llama.cpp", "mlx")


def generate_batch(runtime, prompts: list, *, parallel: int = 8, return_exceptions: bool = False,
                   **settings) -> list:
    """Python API: answer many prompts (strings, with the chat template, or message lists) decoded
    together, `parallel` at a time; the Results come back in input order. Greedy outputs equal
    runtime.generate() on each prompt. A failed request raises, or with return_exceptions=True its
    exception takes its place in the list. Falls back to one at a time where batching is unsupported."""
    if not isinstance(parallel, int) or parallel < 1:
        from ..errors import ParameterError

        raise ParameterError(f"parallel must be an integer >= 1, got {parallel!r}")
    out: list = [None] * len(prompts)
    if parallel == 1 or not batched_supported(runtime):
        for i, p in enumerate(prompts):
            out[i] = _call(lambda: runtime.generate(p, **settings), return_exceptions)
        return out
    s = runtime.settings(**settings)
    requests = ((i, runtime.encode(p), s) for i, p in enumerate(prompts))
    for i, res in runtime.stream_many(requests, parallel=min(parallel, max(len(prompts), 1)), overlap=s.overlap):
        if isinstance(res, BaseException) and not return_exceptions:
            raise res
        out[i] = res
    return out


def _call(fn, return_exceptions: bool):
    try:
        return fn()
    except Exception as e:
        if not return_exceptions:
            raise
        return e


def request_input(req: Request, defaults: dict) -> tuple[Any, dict]:
    """(prompt or messages, settings) for the runtime: per-line overrides over the defaults."""
    settings = {k: v for k, v in defaults.items() if v is not None}
    settings.update(req.settings)
    system = settings.pop("system", None)
    if req.prompt is not None:
        messages = [{"role": "user", "content": req.prompt}]
    else:
        messages = list(req.messages)
    if system is not None:
        if messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": system}
        else:
            messages.insert(0, {"role": "system", "content": system})
    return messages, settings


def run_request(runtime, req: Request, defaults: dict, compare: bool) -> dict:
    """One request -> its record; any failure becomes an error record (Ctrl-C still stops the run)."""
    messages, settings = request_input(req, defaults)
    try:
        result = runtime.generate(messages, **settings)
    except Exception as e:
        return _failure(req, e)
    return _finish(runtime, req, result, messages, settings, compare)


def _finish(runtime, req: Request, result, messages, settings: dict, compare: bool) -> dict:
    rec = result_record(req, result)
    if compare:
        try:
            rec["finetuned_text"] = runtime.compare(messages, **settings).text
        except Exception as e:
            return _failure(req, e)
    return rec


def _failure(req: Request, e: BaseException) -> dict:
    """EpicodeError: its one-line message; anything else (a bug) also names its type. Never lose the run."""
    msg = one_line(e) if isinstance(e, EpicodeError) else f"{type(e).__name__}: {one_line(e)}"
    return _error(req.id, req.line, msg)


def result_record(req: Request, result) -> dict:
    return {
        "id": req.id, "line": req.line, "text": result.text, "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
        "changed_tokens": result.changed_tokens, "timings": _timings(result.timings),
        **({} if result.stats.constraint_complete is None
           else {"constraint_complete": result.stats.constraint_complete}),
    }


TIMINGS = ("ttft_s", "decode_s", "total_s", "tokens_per_s", "skip_rate")  # kept in each record


def _timings(t: dict | None) -> dict:
    t = t or {}
    return {k: round(float(t[k]), 6) for k in TIMINGS if t.get(k) is not None}


