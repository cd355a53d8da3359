"""`serve` against hostile clients, on 127.0.0.1 with real sockets: chunked bodies counted while read, idle and
half-sent connections timed out, a connection limit below the descriptor limit, a SIGTERM that does not wait on
a client that never finished its request, slots that do not fit refused at start-up, integers beyond float range,
a non-ASCII API key, and the server's own failures (NaN logits) reported as 5xx with /health saying so.

Every server here is bounded: few connections, timeouts of a few seconds, stopped at the end of its test.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from epicode_edge.apps import serve
from epicode_edge.errors import BackendError, ParameterError
from rt_models import N_THREADS, bundle_dir, f32_runtime

QUANT = os.environ.get("SERVE_TEST_QUANT", "F32")
MESSAGES = [{"role": "user", "content": "What is 17 + 25?"}]


class Live:
    """make_server() on a free port, run in a thread (uvicorn with the guarded protocol, as the CLI runs it)."""

    def __init__(self, rt, **cfg):
        self.served = serve.make_server(rt, serve.ServeConfig(name="tiny", **cfg), port=0, log_level="error")
        self.thread = threading.Thread(target=self.served.run, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.served.server.started:
            assert time.time() - t0 < 30 and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        self.url, self.port = self.served.url, self.served.port

    def stop(self):
        self.served.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    r = f32_runtime(tmp_path_factory)
    yield r
    r.close()


@pytest.fixture
def live(rt, request):
    servers = []

    def start(**cfg):
        s = Live(rt, **cfg)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def _read_all(s: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """(bytes read, closed) within timeout: closed is True when the server closed the connection."""
    got, end = b"", time.time() + timeout
    while time.time() < end:
        r, _, _ = select.select([s], [], [], max(0.0, end - time.time()))
        if not r:
            break
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, OSError):
            return got, True
        if not chunk:
            return got, True
        got += chunk
    return got, False


# ---------------------------------------------------------------------------------------------- item 3


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(live):
    """A chunked body has no Content-Length: it must be counted while read, not read whole. The client offers
    64 MiB against a limit of 64 KiB; the 413 comes back after a small part (kernel buffers) was sent."""
    s = live(max_body_bytes=64 * 1024)
    c = _connect(s.port)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b"%x\r\n%s\r\n" % (16384, b"x" * 16384)
    sent, answer = 0, b""
    c.settimeout(10)
    try:
        while sent < 64 * 2 ** 20:
            r, _, _ = select.select([c], [], [], 0)
            if r:
                break
            c.sendall(piece)
            sent += 16384
    except (BrokenPipeError, ConnectionResetError, socket.timeout):
        pass
    answer, _ = _read_all(c, 10)
    c.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"larger than 65536 bytes" in answer
    assert sent < 16 * 2 ** 20, f"{sent} bytes went in before the 413"


def test_a_chunked_body_within_the_limit_is_served_and_a_large_content_length_refused_at_once(live):
    s = live(max_body_bytes=64 * 1024)
    body = json.dumps({"messages": MESSAGES, "max_tokens": 2}).encode()
    r = httpx.post(s.url + "/v1/chat/completions", content=iter([body[:10], body[10:]]), timeout=60)  # chunked
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    c = _connect(s.port)
    c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n{}")
    got, closed = _read_all(c, 10)
    c.close()
    assert got.startswith(b"HTTP/1.1 413") and closed, got[:200]


# ---------------------------------------------------------------------------------------------- item 4


def test_idle_and_half_sent_connections_are_closed_after_the_read_timeout(live):
    s = live(read_timeout=1.0)
    idle = [_connect(s.port) for _ in range(5)]
    half_header = _connect(s.port)
    half_header.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    half_body = _connect(s.port)
    half_body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mess")
    for c in idle:
        got, closed = _read_all(c, 5)
        assert closed and got == b"", got
    got, closed = _read_all(half_header, 5)
    assert closed and got.startswith(b"HTTP/1.1 408"), got
    got, closed = _read_all(half_body, 5)
    assert closed and got.startswith(b"HTTP/1.1 408"), got
    assert b"did not arrive whole within 1 s" in got
    for c in (*idle, half_header, half_body):
        c.close()
    assert httpx.get(s.url + "/health", timeout=10).status_code == 200


def test_idle_connections_cannot_starve_the_server(live):
    """Beyond max_connections, a new connection closes the oldest one still sending its request: 40 idle sockets
    (read timeout 60 s, so no timeout helps here) leave /health and a completion reachable."""
    s = live(max_connections=4, read_timeout=60.0)
    idle = [_connect(s.port) for _ in range(40)]
    time.sleep(0.3)
    r = httpx.get(s.url + "/health", timeout=5)
    assert r.status_code == 200
    r = httpx.post(s.url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
    open_ = sum(not _read_all(c, 0.05)[1] for c in idle)
    assert open_ <= 4, f"{open_} idle connections still open with max_connections 4"
    for c in idle:
        c.close()


_SERVE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[1])))
from epicode_edge.cli import main
sys.argv = ["epicode-edge", "serve"] + sys.argv[2:]
main()
"""


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))


def _start_cli(bundle, nofile: int, *args) -> tuple[subprocess.Popen, int, list]:
    proc = subprocess.Popen([sys.executable, "-c", _SERVE, str(nofile), str(bundle), "--port", "0", "--quant", QUANT,
                             "--n-ctx", "256", "--threads", "1", "--parallel", "2", *args],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=_env())
    lines, t0 = [], time.time()
    while True:
        line = proc.stderr.readline().decode()
        assert line or proc.poll() is None, "".join(lines)
        lines.append(line)
        if line.startswith("Serving"):
            break
        assert time.time() - t0 < 60, "".join(lines)
    port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
    return proc, port, lines


def test_at_the_descriptor_limit_health_answers_the_log_stays_small_and_sigterm_stops(tmp_path_factory):
    """The CLI under `ulimit -n 320` and --max-connections 500: the limit is lowered below the descriptors left
    (a note says so); 300 idle sockets later /health still answers and stderr holds a few lines, not a
    traceback per accept; with a half-sent request open (read and graceful-shutdown timeouts 60 s), SIGTERM
    stops the server well before the graceful timeout (uvicorn re-raises the signal once it has shut down: exit status -15)."""
    proc, port, lines = _start_cli(bundle_dir(tmp_path_factory), 320, "--max-connections", "500",
                                   "--read-timeout", "60", "--shutdown-timeout", "60")
    idle = []
    try:
        for _ in range(300):
            try:
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                break
        time.sleep(0.5)
        r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        half = socket.create_connection(("127.0.0.1", port), timeout=5)
        half.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"mo")
        time.sleep(0.3)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
        # a shutdown that waited on the half-sent request would take the whole 60 s graceful timeout
        assert time.time() - t0 < 30 and proc.returncode in (0, -signal.SIGTERM), (time.time() - t0, proc.returncode)
        err = proc.stderr.read().decode()
        assert "Traceback" not in err and len(err) < 8000, err[-2000:]
        assert any("max_connections lowered from 500" in x for x in lines), lines
    finally:
        for c in idle:
            c.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------- item 5


def test_slots_that_do_not_fit_are_refused_at_start_up(rt):
    with pytest.raises(BackendError, match=r"serve --parallel 300 .*cannot make a context .*lower --parallel"):
        serve.create_app(rt, serve.ServeConfig(parallel=300))


def test_slots_whose_caches_do_not_fit_in_memory_are_refused_at_start_up(rt, monkeypatch):
    """The three slot sets (EpiCoDe's two models and the finetuned one) against the memory available, here
    1 kB: refused before any context is made, naming what to lower."""
    from epicode_edge.converters.bundle import human_bytes

    monkeypatch.setattr(serve, "available_memory", lambda: 1000)
    with pytest.raises(ParameterError, match=r"serve --parallel 4: the KV caches need .* more than the "
                                             f"{human_bytes(1000)} .*lower --parallel or --n-ctx"):
        serve.create_app(rt, serve.ServeConfig(parallel=4))


def test_the_cli_refuses_slots_that_do_not_fit_in_one_line(tmp_path_factory):
    proc = subprocess.run([sys.executable, "-c", _SERVE, "1024", str(bundle_dir(tmp_path_factory)), "--port", "0",
                           "--quant", "F32", "--n-ctx", "256", "--parallel", "300"],
                          capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.returncode == 1, proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("Error: ")]
    assert len(errors) == 1 and "--parallel 300" in errors[0] and "Traceback" not in proc.stderr
    assert "Serving" not in proc.stderr


def test_health_lists_the_slots_from_start_up(live):
    s = live(parallel=3, max_queue=5)
    h = httpx.get(s.url + "/health", timeout=5).json()
    assert h["status"] == "ok" and h["models"] == ["tiny", "tiny:finetuned"]
    for m in ("tiny", "tiny:finetuned"):
        assert (h["slots"][m]["slots"], h["slots"][m]["busy"], h["slots"][m]["max_queue"]) == (3, 0, 5)


# ---------------------------------------------------------------------------------------------- item 6


@pytest.mark.parametrize("field, value", [("lambda", 10 ** 309), ("repetition_penalty", 10 ** 309),
                                          ("temperature", -10 ** 309), ("top_k", 10 ** 309), ("seed", 10 ** 309)])
def test_an_integer_beyond_float_range_is_a_400_naming_the_field(live, field, value):
    s = live()
    body = json.dumps({"messages": MESSAGES, "max_tokens": 2, field: value}).encode()
    r = httpx.post(s.url + "/v1/chat/completions", content=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and f"'{field}'" in err["message"] and len(err["message"]) < 200


def test_nan_and_infinity_tokens_are_not_json(live):
    s = live()
    r = httpx.post(s.url + "/v1/chat/completions", timeout=30,
                   content=b'{"messages": [{"role": "user", "content": "hi"}], "lambda": NaN}')
    assert r.status_code == 400 and "NaN is not a JSON number" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- item 7


def test_a_non_ascii_api_key_is_refused_at_start(rt):
    for key in ("clé", "two words", "tab\tkey", ""):
        with pytest.raises(ParameterError, match="API key must be printable ASCII"):
            serve.create_app(rt, serve.ServeConfig(api_key=key))


def test_the_cli_refuses_a_non_ascii_api_key_before_loading(tmp_path):
    from cli_helpers import assert_one_line_error, cli

    code, out = cli("serve", tmp_path / "no-bundle", "--api-key", "clé", "--port", "0")
    assert_one_line_error(code, out, "API key must be printable ASCII")


def test_the_key_is_compared_as_bytes(live):
    """A client's raw header bytes against the key's: a UTF-8 near-miss is a 401, the right key a 200."""
    s = live(api_key="k3y-Ok")
    for header, status in ((b"Bearer k3y-\xc3\xa9k", 401), (b"Bearer k3y-Ok", 200), (b"bearer k3y-Ok", 200)):
        c = _connect(s.port)
        c.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: " + header + b"\r\n\r\n")
        got, _ = _read_all(c, 10)
        c.close()
        assert got.startswith(b"HTTP/1.1 %d" % status), (header, got[:100])


# ---------------------------------------------------------------------------------------------- item 8


@pytest.fixture(scope="module")
def broken_rt(tmp_path_factory):
    """The tiny bundle's F32 expert with NaN in its final norm (a corrupted file), beside the sound amateur."""
    import shutil

    import gguf

    from epicode_edge.runtime import load_models

    b = bundle_dir(tmp_path_factory)
    f = shutil.copy(b / "gguf/expert-F32.gguf", tmp_path_factory.mktemp("broken") / "expert-F32.gguf")
    t = next(t for t in gguf.GGUFReader(f).tensors if t.name == "output_norm.weight")
    with open(f, "r+b") as fh:
        fh.seek(int(t.data_offset))
        fh.write(np.full(int(t.n_elements), np.nan, dtype=np.float32).tobytes())
    r = load_models(f, b / "gguf/amateur-F32.gguf", n_ctx=256, n_threads=N_THREADS)
    yield r
    r.close()


def test_nan_logits_are_a_server_error_and_health_says_so(broken_rt):
    s = Live(broken_rt)
    try:
        assert httpx.get(s.url + "/health", timeout=5).json()["status"] == "ok"
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3}, timeout=60)
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["type"] == "server_error" and "non-finite logits" in err["message"]
        h = httpx.get(s.url + "/health", timeout=5)
        assert h.status_code == 503 and h.json()["status"] == "failing"
        assert "non-finite logits" in h.json()["error"]
        ok = httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny:finetuned", "messages": MESSAGES,
                                                              "max_tokens": 3}, timeout=60)
        assert ok.status_code == 200  # the finetuned model alone (the sound amateur) still answers
    finally:
        s.stop()


def test_failed_accepts_are_said_once_not_a_traceback_each(caplog):
    """asyncio reports each accept() that fails for lack of descriptors (EMFILE) with a traceback; at the limit
    that is thousands a second. The server's loop says it once (a minute) with the count."""
    import asyncio
    import errno

    caplog.set_level(logging.WARNING)
    loop = asyncio.new_event_loop()
    try:
        serve._quiet_accept_errors(loop)
        for _ in range(200):
            loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                         "exception": OSError(errno.EMFILE, "Too many open files")})
        loop.call_exception_handler({"message": "something else", "exception": RuntimeError("other")})
    finally:
        loop.close()
    said = [r for r in caplog.records if "cannot accept connections" in r.getMessage()]
    assert len(said) == 1 and "Too many open files" in said[0].getMessage() and said[0].exc_info is None
    others = [r for r in caplog.records if r not in said]
    assert len(others) == 1 and "something else" in others[0].getMessage()  # other errors still reported
