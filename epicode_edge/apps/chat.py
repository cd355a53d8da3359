"""The offline chat REPL, as people know it from llama-cli, mlx_lm.chat and Ollama.

    app = ChatApp(runtime, system="You are terse.", lam=0.5)
    run_repl(app)            # reads stdin: a TTY (readline history) or a pipe (scripted sessions)

Each line is a message to the model, or a command:
    /help  /reset  /system TEXT  /set NAME VALUE  /stats  /compare  /show  /bye   (Ctrl-D also exits)
A message spans several lines when wrapped in triple quotes (\"\"\" ... \"\"\"), as in Ollama.

Answers stream to stdout; after each, a line with tokens/s goes to stderr. Ctrl-C during an answer stops
that answer and keeps the session: the partial answer stays in the history (it is what the user saw, and
the model's KV caches already hold it), so the next turn continues from it. Ctrl-C at an interactive
prompt clears the line; a second Ctrl-C there, or Ctrl-D, exits.

The UI logic is in `ChatApp` (one method per command, output through two writer callables) so that it is
testable without a terminal; `run_repl` is only the read loop.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ContextFullError, EpicodeError, InputError, ParameterError, one_line

HELP = """\
Commands:
  /help                 this help
  /reset                forget the conversation (keeps the system prompt and settings)
  /system TEXT          set the system prompt (the conversation stays); /system alone clears it
  /set NAME VALUE       change a setting: lambda alpha temp top_p top_k min_p max_tokens seed
                        (seed none = a fresh random seed per answer)
  /stats                tokens, tokens/s, tokens changed by contrastive decoding, prefill counts
  /compare              answer the last prompt with the finetuned model alone, next to EpiCoDe's answer
  /show                 the bundle and the current settings
  /bye                  exit (or Ctrl-D)
Ctrl-C stops the current answer and keeps the session. Wrap a multi-line message in \"\"\" ... \"\"\".
A message that starts with / is sent by doubling it: //etc/hosts sends /etc/hosts."""


def _float(v: str) -> float:
    x = float(v)
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError(v)
    return x


def _seed(v: str):
    return None if v.lower() in ("none", "random", "-1") else int(v)


# /set NAME -> (Python keyword, parser); the ranges are checked by runtime.Settings, as for every request
SETTINGS = {
    "lambda": ("lam", _float), "alpha": ("alpha", _float), "temp": ("temp", _float), "top_p": ("top_p", _float),
    "top_k": ("top_k", int), "min_p": ("min_p", _float), "max_tokens": ("max_tokens", int), "seed": ("seed", _seed),
}
_ALIASES = {"lam": "lambda", "temperature": "temp", "top-p": "top_p", "top-k": "top_k", "min-p": "min_p",
            "max-tokens": "max_tokens"}
_TYPE_WORDS = {int: "an integer", _float: "a number", _seed: "an integer or 'none'"}


def parse_setting(name: str, value: str) -> tuple[str, object]:
    """('/set' NAME, VALUE) -> (Python keyword, checked value). Raises ParameterError with a clear message."""
    name = _ALIASES.get(name.lower(), name.lower())
    if name not in SETTINGS:
        raise ParameterError(f"unknown setting {name!r}; one of: {', '.join(SETTINGS)}")
    key, parse = SETTINGS[name]
    try:
        x = parse(value)
    except ValueError:
        raise ParameterError(f"{name} must be {_TYPE_WORDS[parse]}, got {value!r}") from None
    if x is not None:
        from ..runtime import Settings

        Settings().updated(**{key: x})
    return key, x


@dataclass
class Command:
    name: str  # help reset system set stats compare show bye, or "unknown"
    arg: str = ""


_COMMANDS = {"help": "help", "?": "help", "reset": "reset", "clear": "reset", "system": "system", "set": "set",
             "stats": "stats", "compare": "compare", "show": "show", "bye": "bye", "exit": "bye", "quit": "bye"}


def parse_command(line: str) -> Command | None:
    """A '/command ...' line -> Command; None for an ordinary message."""
    s = line.strip()
    if not s.startswith("/") or s.startswith("//"):
        return None
    head, _, arg = s[1:].partition(" ")
    name = _COMMANDS.get(head.lower())
    return Command(name, arg.strip()) if name else Command("unknown", head)


Writer = Callable[[str], None]


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _stderr(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


@dataclass
class Turn:
    """What one answer cost; /stats adds them up."""

    tokens: int = 0          # answer tokens streamed
    changed: int = 0         # picks where contrastive decoding changed the expert's choice
    seconds: float = 0.0     # wall time of the answer (prefill included)
    tokens_per_s: float = 0.0  # decode speed (first pick to the end), as llama-cli reports it
    prefill: tuple = (0, 0)  # tokens prefilled by (expert, amateur) for this answer
    stopped: bool = False    # Ctrl-C


class ChatApp:
    """The REPL's state and commands over a Runtime's ChatSession. `out` gets the model's text, `err` the
    status lines (tokens/s, errors); both default to the process's stdout/stderr."""

    def __init__(self, runtime, *, system: str | None = None, out: Writer = _stdout, err: Writer = _stderr,
                 dim: bool = False, **settings):
        self.runtime = runtime
        self.out, self.err, self.dim = out, err, dim
        self.session = runtime.chat(system=system, **{k: v for k, v in settings.items() if v is not None})
        self.turns: list[Turn] = []
        self.last_answer: str | None = None

    # -- the loop's entry point ---------------------------------------------------------------------
    def handle(self, line: str) -> bool:
        """One input line (a message or a command); False when the session should end."""
        cmd = parse_command(line)
        if cmd is None:
            if line.strip():
                self.answer(line.lstrip()[1:] if line.lstrip().startswith("//") else line)
            return True
        if cmd.name == "bye":
            return False
        if cmd.name == "unknown":
            self.status(f"Unknown command /{cmd.arg}; /help lists the commands.")
            return True
        getattr(self, "cmd_" + cmd.name)(cmd.arg)
        return True

    def status(self, text: str) -> None:
        self.err((f"\x1b[2m{text}\x1b[0m" if self.dim else text) + "\n")

    # -- answering ----------------------------------------------------------------------------------
    def answer(self, text: str) -> Turn | None:
        """Stream the answer to `text`; Ctrl-C stops it (the partial answer stays in the history)."""
        try:
            stream = self.session.send(text)
        except EpicodeError as e:  # e.g. the conversation no longer fits the context
            self.status(f"Error: {one_line(e)}")
            return None
        turn, pieces, t0 = Turn(), [], time.perf_counter()
        c0 = [b.counters.prefill_tokens for _, b in _backends(self.runtime)]
        try:
            with _sigint_flag() as stop:
                for ev in stream:
                    self._take(ev, turn, pieces)  # shown even after Ctrl-C: the history has it
                    if stop.is_set():
                        turn.stopped = True
                        break
        except KeyboardInterrupt:
            turn.stopped = True
        except EpicodeError as e:  # e.g. the conversation no longer fits the context
            stream.close()
            self._forget_failed_turn(text, pieces)
            if pieces:
                self.out("\n")
            full = isinstance(e, ContextFullError) and self.session.history
            hint = " (/reset starts a new conversation)" if full else ""
            self.status(f"Error: {one_line(e)}{hint}")
            return None
        finally:
            stream.close()  # GeneratorExit at a yield: the session keeps what was streamed
        turn.prefill = tuple(b.counters.prefill_tokens - c for (_, b), c in zip(_backends(self.runtime), c0))
        if turn.stopped or not turn.seconds:
            turn.seconds = time.perf_counter() - t0
            turn.tokens_per_s = turn.tokens / turn.seconds if turn.seconds > 0 else 0.0
        self.out("\n")
        self.turns.append(turn)
        self.last_answer = "".join(pieces)
        self.status(_turn_line(turn))
        return turn

    def _forget_failed_turn(self, text: str, pieces: list[str]) -> None:
        """A turn that failed (nothing sensible streamed) leaves no trace in the history, so that the next
        message does not fail the same way."""
        h = self.session.history
        if h[-2:] == [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces)}]:
            del h[-2:]

    def _take(self, ev, turn: Turn, pieces: list[str]) -> None:
        if ev.text:
            self.out(ev.text)
            pieces.append(ev.text)
        if ev.token is not None:
            turn.tokens += 1
            turn.changed += bool(ev.changed)
        st = ev.stats
        if st is not None:  # the final event
            turn.seconds, turn.tokens_per_s = st.total_s, st.tokens_per_s

    # -- commands -----------------------------------------------------------------------------------
    def cmd_help(self, arg: str = "") -> None:
        self.status(HELP)

    def cmd_reset(self, arg: str = "") -> None:
        self.session.reset()
        self.last_answer = None
        self.status("Conversation cleared.")

    def cmd_system(self, arg: str) -> None:
        """The conversation stays; the next turn re-prefills from the start (the system prompt comes first)."""
        try:
            self.session.set_system(arg)
        except EpicodeError as e:  # kept out, or every later turn would fail on it
            self.status(f"Error: {one_line(e)}")
            return
        self.status("System prompt set." if arg else "System prompt cleared.")

    def cmd_set(self, arg: str) -> None:
        name, _, value = arg.partition(" ")
        if not name or not value.strip():
            self.status(f"Usage: /set NAME VALUE  (NAME: {', '.join(SETTINGS)})")
            return
        try:
            key, x = parse_setting(name, value.strip())
            self.session.set(**{key: x})
        except EpicodeError as e:
            self.status(f"Error: {one_line(e)}")
            return
        self.status(f"Set {_name(key)} = {x}")

    def cmd_stats(self, arg: str = "") -> None:
        self.status(self.stats_text())

    def stats_text(self) -> str:
        tokens = sum(t.tokens for t in self.turns)
        seconds = sum(t.seconds for t in self.turns)
        changed = sum(t.changed for t in self.turns)
        share = f" ({100 * changed / tokens:.1f}%)" if tokens else ""
        lines = [f"turns: {len(self.turns)}",
                 f"answer tokens: {tokens} in {seconds:.2f} s ({_rate(tokens, seconds)} overall)",
                 f"changed by contrastive decoding: {changed} of {tokens}{share}"]
        if self.turns:
            t = self.turns[-1]
            lines.append(f"last turn: {t.tokens} tokens, {t.tokens_per_s:.1f} tok/s decode, "
                         f"prefilled {t.prefill[0]} (expert) / {t.prefill[1]} (amateur) tokens")
        for role, backend in _backends(self.runtime):
            c = backend.counters
            lines.append(f"{role}: {c.prefill_tokens} tokens prefilled in {c.prefill_calls} calls, "
                         f"{c.step_calls} decode steps, {backend.n_past} of {backend.n_ctx} context cached")
        return "\n".join(lines)

    def cmd_compare(self, arg: str = "") -> None:
        if self.last_answer is None:
            self.status("Nothing to compare yet: send a message first.")
            return
        try:
            result = self.session.compare()
        except EpicodeError as e:
            self.status(f"Error: {one_line(e)}")
            return
        self.out(f"--- EpiCoDe ---\n{self.last_answer}\n--- finetuned alone ---\n{result.text}\n")

    def cmd_show(self, arg: str = "") -> None:
        self.status(self.show_text())

    def show_text(self) -> str:
        rt = self.runtime
        lines = [f"bundle: {rt.path}", f"backend: {rt.backend}" + (f" ({rt.quant})" if rt.quant else "")]
        if rt.mu is not None:
            lines.append(f"mu: {rt.mu}")
        for role, backend in _backends(rt):
            lines.append(f"{role}: {backend.path}")
        system = self.session.system
        lines.append(f"system: {system!r}" if system else "system: (none)")
        current = self.session.settings.as_dict()
        c = self.session.settings.constraint
        if c is not None:  # from --json-schema / --regex / --grammar / --json-object
            current["constraint"] = c.kind if c.kind == "json_object" else f"{c.kind} {c.text!r}"
        lines.append("settings: " + ", ".join(f"{_name(k)}={v}" for k, v in current.items()))
        return "\n".join(lines)


def _name(key: str) -> str:
    return "lambda" if key == "lam" else key




def _backends(runtime) -> list:
    return [(role, getattr(runtime, role)) for role in ("expert", "amateur")]


def _rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:.1f} tok/s" if seconds > 0 else "- tok/s"


def _turn_line(turn: Turn) -> str:
    stopped = ", stopped" if turn.stopped else ""
    return f"[{turn.tokens} tokens, {turn.tokens_per_s:.1f} tok/s, {turn.changed} changed by CD{stopped}]"


@contextmanager
def _sigint_flag():
    """While active, Ctrl-C sets a flag (the answer loop stops at the next token, at a clean point)
    instead of raising; a second Ctrl-C raises KeyboardInterrupt. Only in the main thread."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def on_sigint(signum, frame):
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except (ValueError, OSError):  # not possible here: plain KeyboardInterrupt handling
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------------------------------
# the read loop
# ---------------------------------------------------------------------------------------------

HISTORY_FILE = Path(os.environ.get("EPICODE_EDGE_HISTORY", "~/.epicode_edge_history")).expanduser()


def read_message(readline: Callable[[str], str], prompt: str = ">>> ", more: str = "... ") -> str:
    """One message: a line, or the lines between triple quotes. Raises EOFError at end of input, InputError
    for a message longer than MAX_LINE_CHARS."""
    line = readline(prompt)
    if not line.lstrip().startswith('"""'):
        return line
    body = line.lstrip()[3:]
    if body.rstrip().endswith('"""') and body.strip() != "":
        return body.rstrip()[:-3]
    lines = [body] if body else []
    size = len(body)
    while True:
        try:
            nxt = readline(more)
        except EOFError:
            return "\n".join(lines)
        if nxt.rstrip().endswith('"""'):
            lines.append(nxt.rstrip()[:-3])
            return "\n".join(lines).strip("\n")
        lines.append(nxt)
        size += len(nxt) + 1
        if size > MAX_LINE_CHARS:
            raise InputError(f"a message between triple quotes is longer than {MAX_LINE_CHARS} characters (the "
                             "limit per message)")


MAX_LINE_CHARS = 1 << 20  # the longest line (and message) read from a pipe: stdin from /dev/zero stops here


def _pipe_reader(stream) -> Callable[[str], str]:
    count = itertools.count(1)

    def readline(prompt: str) -> str:
        line = stream.readline(MAX_LINE_CHARS + 1)
        n = next(count)
        if not line:
            raise EOFError
        if len(line) > MAX_LINE_CHARS and not line.endswith("\n"):  # (readline's cap: no newline in it)
            raise InputError(f"stdin line {n} is longer than {MAX_LINE_CHARS} characters (the limit per line)")
        return line.rstrip("\r\n")

    return readline


def _tty_reader() -> Callable[[str], str]:
    try:
        import readline as rl
    except ImportError:  # Windows without pyreadline: plain input()
        return input
    try:
        rl.read_history_file(HISTORY_FILE)
    except OSError:
        pass
    rl.set_history_length(1000)
    import atexit

    atexit.register(_save_history, rl)
    return input


def _save_history(rl) -> None:
    try:
        rl.write_history_file(HISTORY_FILE)
    except OSError:
        pass


def run_repl(app: ChatApp, stdin=None, interactive: bool | None = None) -> None:
    """Read messages until /bye or end of input. Interactive (a TTY): a prompt, readline editing and
    history, Ctrl-C clears the line. Piped: no prompt, each line is a message or a command."""
    stdin = sys.stdin if stdin is None else stdin
    if hasattr(stdin, "reconfigure"):  # bytes that are not UTF-8 reach the session (which refuses that
        try:                           # message with one line) instead of ending it with a decode error
            stdin.reconfigure(errors="surrogateescape")
        except (ValueError, OSError):
            pass
    if interactive is None:
        interactive = stdin.isatty()
    readline = _tty_reader() if interactive else _pipe_reader(stdin)
    if interactive:
        app.status("Type a message, /help for commands, Ctrl-D or /bye to exit.")
    armed = False  # a Ctrl-C at an empty prompt arms exit on the next one
    while True:
        try:
            message = read_message(readline, ">>> " if interactive else "", "... " if interactive else "")
        except EOFError:
            if interactive:
                app.err("\n")
            return
        except KeyboardInterrupt:
            if not interactive or armed:
                app.err("\n")
                return
            armed = True
            app.err("\n")
            app.status("(Use Ctrl-D or /bye to exit.)")
            continue
        armed = False
        if not app.handle(message):
            return
