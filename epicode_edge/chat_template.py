"""Chat templates rendered as transformers renders them, in a bounded Jinja sandbox.

A chat template is code from a model file (people share bundles), so it runs sandboxed (no attribute escapes),
with its output size, repeat counts and widths bounded, and (in the main thread) its time: a runaway template
fails with one InputError line instead of hanging or eating memory. Messages and texts are checked here too.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

from .errors import InputError, ParameterError

RENDER_SECONDS = 5.0  # a chat template renders in milliseconds; a runaway one is stopped after this
RENDER_MAX_CHARS = 1 << 23  # 8M characters: far beyond any context window
_TEMPLATE_MAX_INT = 10**7  # widths and repeat counts a template may use


class _RenderTimeout(Exception):
    pass


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                bos_token: str | None = None, eos_token: str | None = None, **extra) -> str:
    """Render a Jinja chat template in a sandbox, with the variables and helpers transformers provides.

    Bounded: the output at RENDER_MAX_CHARS characters, repeat counts and widths at 10**7, and (in the main
    thread, where signals allow it) the time at RENDER_SECONDS; past a bound the render fails with InputError.
    """
    try:
        with _deadline(RENDER_SECONDS):
            parts, size = [], 0
            for piece in _compiled(template).generate(
                    messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token or "",
                    eos_token=eos_token or "", **extra):
                size += len(piece)
                if size > RENDER_MAX_CHARS:
                    raise InputError(f"chat template output exceeds {RENDER_MAX_CHARS} characters (runaway template?)")
                parts.append(piece)
            return "".join(parts)
    except InputError:
        raise
    except _RenderTimeout:
        raise InputError(f"chat template took more than {RENDER_SECONDS:g} s to render (runaway loop?)") from None
    except MemoryError:
        raise InputError("chat template ran out of memory while rendering (runaway template?)") from None
    except Exception as e:  # jinja2 TemplateError or raise_exception() from the template
        raise InputError(f"chat template failed: {' '.join(str(e).split())[:300]}") from None


@contextmanager
def _deadline(seconds: float):
    """Raise _RenderTimeout in the main thread after `seconds` (a no-op where there is no SIGALRM, off the
    main thread, or when another timer is running)."""
    import signal
    import threading

    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise _RenderTimeout()

    if signal.getitimer(signal.ITIMER_REAL)[0] > 0:
        yield
        return
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _too_big(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) > _TEMPLATE_MAX_INT


def _bounded_sandbox():
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """The sandbox, with the allocations a template can ask for in one operation bounded."""

        intercepted_binops = frozenset(["*", "**", "%"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > RENDER_MAX_CHARS:
                        raise SecurityError("a repeated sequence too large for a chat template")
            elif operator == "**":
                if isinstance(right, (int, float)) and abs(right) > 1024:
                    raise SecurityError("an exponent too large for a chat template")
            elif operator == "%" and isinstance(left, str) and _format_width_too_big(left):
                raise SecurityError("a format width too large for a chat template")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
            fmt = None  # the string of a str.format call (the sandbox wraps the bound method)
            if getattr(__obj, "__name__", "") in ("format", "format_map"):
                fmt = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
            if any(_too_big(v) for v in list(args) + list(kwargs.values())) or (
                    isinstance(fmt, str) and _format_width_too_big(fmt)):
                raise SecurityError("an argument too large for a chat template")
            return super().call(__context, __obj, *args, **kwargs)

    return BoundedSandbox


def _format_width_too_big(text: str) -> bool:
    import re

    return any(len(run) > 7 for run in re.findall(r"\d+", text)) and ("%" in text or "{" in text)


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    """The template compiled once (a few ms each time: every request renders its bundle's one template)."""
    return _jinja_env().from_string(template)


def _jinja_env():
    import json
    from datetime import datetime

    from jinja2.ext import loopcontrols

    def raise_exception(message):
        raise ValueError(message)

    env = _bounded_sandbox()(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    for name in ("center", "indent", "format", "wordwrap", "truncate"):
        env.filters[name] = _bounded_filter(env.filters[name], name == "format")
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _bounded_filter(f, is_format: bool):
    from functools import wraps

    from jinja2.sandbox import SecurityError

    @wraps(f)
    def bounded(*args, **kwargs):
        values = list(args[1:]) + list(kwargs.values())
        if any(_too_big(v) for v in values) or (is_format and args and isinstance(args[0], str)
                                                 and _format_width_too_big(args[0])):
            raise SecurityError("an argument too large for a chat template")
        return f(*args, **kwargs)

    return bounded


def check_text(text: str, what: str) -> str:
    """text as given, or InputError when it holds bytes that are not UTF-8 (undecodable input bytes arrive
    as lone surrogates: a command-line argument, stdin read with surrogateescape, a JSON escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = ord(text[e.start])
        byte = f"byte 0x{ch - 0xDC00:02x}" if 0xDC80 <= ch <= 0xDCFF else f"lone surrogate U+{ch:04X}"
        raise InputError(f"{what} is not valid UTF-8 ({byte} at character {e.start})") from None
    return text


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ParameterError("messages must be a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ParameterError(f"messages[{i}] must be an object with string 'role' and 'content'")
    return [dict(m) for m in messages]


