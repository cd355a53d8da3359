"""Load test: `epicode-edge serve` against llama-cpp-python's own server on the expert GGUF alone, same run.

    python bench/serve.py                                # 4 clients x 4 requests x 32 tokens, 3 runs
    python bench/serve.py --clients 8 --requests 2 --max-tokens 64 --parallel 8
    python bench/serve.py --bundle models/demo/bundle --quant Q8_0 --runs 5
    python bench/serve.py --bundle runs/S --load --runs 1    # idle and loaded rows (below)

Both servers run in child processes on 127.0.0.1 (free ports), with the same threads and context size:
    ours     epicode-edge serve BUNDLE --parallel P: expert + amateur, contrastive decoding, requests decoded
             together (continuous batching over P slots)
    anchor   python -m llama_cpp.server --model <the bundle's expert GGUF> (needs llama-cpp-python[server];
             without it only ours is measured): one model, one request at a time (its server serializes them)
A run: N client threads start together, each sends M non-streaming POST /v1/completions one after another
(greedy, the same raw prompts, max_tokens); then the same against the anchor (the two alternate run by run,
so a shared machine's load drifts on both). The test is bounded: N x M requests a server a run, and it stops
by itself. Figures per run: requests/s and completion tokens/s (tokens from each answer's `usage`) over the
run's wall time, p50 / p95 of the requests' latencies (send to full answer); printed: the median over runs,
and ours / anchor as the median of the per-run ratios. The model is a generated Llama (random weights;
--hidden/--layers, default 512 x 8) in a temporary folder (or --work DIR, reused), as bench/decode.py makes it.
With --load: a third server, ours with --parallel 1 (one request at a time), and every server without
--threads unless given (the engines' own defaults: what a user runs); the runs are made idle, then loaded
(two busy processes beside the servers, started and stopped by the bench, bench/busy.py), and each condition
prints its table with ours / ours --parallel 1 and ours / anchor.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["The quick brown fox", "Question: what is 17 + 25? Answer:", "def add(a, b):",
           "Law, math and logic: if all A are B", "Once upon a time", "0123456789 3.14159"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server in a child process on 127.0.0.1; its output goes to a log file (shown if it fails)."""

    def __init__(self, name: str, argv: list[str], port: int, log: Path, ready_path: str):
        self.name, self.url, self.log = name, f"http://127.0.0.1:{port}", log
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.f = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.f, stderr=subprocess.STDOUT, env=env)
        self._wait(ready_path)

    def _wait(self, path: str, timeout: float = 300) -> None:
        import httpx

        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} server exited ({self.proc.returncode}):\n{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{self.name} server not ready in {timeout:.0f} s:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.f.close()


def one_run(url: str, model: str, clients: int, requests: int, max_tokens: int, extra: dict) -> dict:
    """N clients x M requests each against url; wall time, latencies, tokens, failures."""
    import httpx

    lat, tokens, failures, lock = [], [], [], threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            start.wait()
            for i in range(requests):
                body = {"model": model, "prompt": PROMPTS[(c * requests + i) % len(PROMPTS)],
                        "max_tokens": max_tokens, "temperature": 0.0, **extra}
                t = time.perf_counter()
                r = http.post("/v1/completions", json=body)
                dt = time.perf_counter() - t
                with lock:
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                    else:
                        lat.append(dt)
                        tokens.append(r.json()["usage"]["completion_tokens"])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if failures:
        raise SystemExit(f"{len(failures)} requests failed against {url}, first: {failures[0]}")
    lat.sort()
    return {"rps": len(lat) / wall, "tps": sum(tokens) / wall, "p50": percentile(lat, 50),
            "p95": percentile(lat, 95), "tokens": sum(tokens), "wall": wall}


def percentile(sorted_xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    k = (len(sorted_xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (k - lo)


def has_llama_server() -> str | None:
    """None if `python -m llama_cpp.server` can run here, else why not."""
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError as e:
        return f"{e.name} is missing (pip install 'llama-cpp-python[server]')"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="an existing bundle (default: generate a model)")
    ap.add_argument("--quant", default="Q8_0")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients (N)")
    ap.add_argument("--requests", type=int, default=4, help="requests per client, one after another (M)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--parallel", type=int, default=None, help="our server's slots (default: --clients)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of each server (default: all cores; with --load: the engines' defaults)")
    ap.add_argument("--load", action="store_true", help="idle and loaded rows, and ours with --parallel 1")
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--work", type=Path, default=None, help="folder for the generated model (kept; reused)")
    args = ap.parse_args()
    if args.threads is None and not args.load:
        args.threads = os.cpu_count()
    if min(args.clients, args.requests, args.max_tokens, args.runs, args.threads or 1) < 1:
        raise SystemExit("--clients, --requests, --max-tokens, --runs and --threads must be >= 1")
    parallel = args.parallel or args.clients

    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="epicode-bench-serve-")
        args.work = Path(tmp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.bundle is None:
        from decode import make_bundle

        t = time.perf_counter()
        args.bundle = make_bundle(args.work, args.quant, args.hidden, args.layers)
        print(f"model: generated {args.hidden}x{args.layers} Llama, bundle {args.bundle} "
              f"({time.perf_counter() - t:.0f} s)")
    from epicode_edge.converters.bundle import open_bundle

    expert = open_bundle(args.bundle).gguf("expert", args.quant)
    no_anchor = has_llama_server()
    print(f"expert: {expert.name}; {args.clients} clients x {args.requests} requests x {args.max_tokens} tokens, "
          f"{args.runs} runs; threads {args.threads or 'engine default'}, n_ctx {args.n_ctx}, our --parallel {parallel}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    servers = {}
    try:
        threads = [] if args.threads is None else ["--threads", str(args.threads)]
        for name, p in [("ours", parallel)] + ([("ours-p1", 1)] if args.load else []):
            port = free_port()
            servers[name] = Server(name, [
                sys.executable, "-c", "from epicode_edge.cli import main; main()", "serve", str(args.bundle),
                "--port", str(port), "--parallel", str(p), "--max-queue", str(args.clients * args.requests),
                *threads, "--n-ctx", str(args.n_ctx), "--quant", args.quant, "--name", "bench"],
                port, args.work / f"serve-{name}.log", "/health")
        if no_anchor:
            print(f"anchor: not measured, llama-cpp-python's server cannot run here: {no_anchor}")
        else:
            port = free_port()
            servers["anchor"] = Server("anchor", [
                sys.executable, "-m", "llama_cpp.server", "--model", str(expert), "--model_alias", "expert",
                "--host", "127.0.0.1", "--port", str(port),
                *([] if args.threads is None else ["--n_threads", str(args.threads), "--n_threads_batch",
                                                   str(args.threads)]), "--n_ctx", str(args.n_ctx)],
                port, args.work / "serve-anchor.log", "/v1/models")
        how = {"ours": ("bench", {}), "ours-p1": ("bench", {}),
               "anchor": ("expert", {"repeat_penalty": 1.0})}  # greedy, no penalty
        for name, srv in servers.items():  # warm-up: first requests allocate buffers
            one_run(srv.url, how[name][0], 1, 1, 4, how[name][1])
        from busy import busy_load, load_average

        for cond, n_busy in (("idle", 0), ("loaded", 2)) if args.load else (("", 0),):
            with busy_load(n_busy):
                if cond:
                    print(f"\n{cond} ({n_busy} busy processes; {load_average()})")
                rows = {name: [] for name in servers}
                for run in range(args.runs):
                    for name, srv in servers.items():
                        rows[name].append(one_run(srv.url, how[name][0], args.clients, args.requests,
                                                  args.max_tokens, how[name][1]))
                    print(f"  run {run + 1}/{args.runs}: " + ", ".join(
                        f"{n} {r[-1]['rps']:.2f} req/s {r[-1]['tps']:.1f} tok/s p50 {1000 * r[-1]['p50']:.0f} ms"
                        for n, r in rows.items()))
                if cond:
                    print(f"  after: {load_average()}")
            table(rows)
    finally:
        for srv in servers.values():
            srv.stop()
        if tmp is not None:
            tmp.cleanup()


def table(rows: dict) -> None:
    keys = (("rps", "req/s", 2), ("tps", "tok/s", 1), ("p50", "p50 ms", 0), ("p95", "p95 ms", 0))
    print(f"{'':14}" + "".join(f"{label:>10}" for _, label, _ in keys) + f"{'tokens':>9}")
    for name, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k, _, _ in keys}
        print(f"{name:14}" + "".join(f"{med[k] * (1000 if k.startswith('p') else 1):>10.{d}f}" for k, _, d in keys)
              + f"{statistics.median(r['tokens'] for r in runs):>9.0f}")
    for other, label in (("ours-p1", "ours / ours --parallel 1"), ("anchor", "ours / anchor")):
        if other in rows:
            ratio = {k: statistics.median(o[k] / a[k] for o, a in zip(rows["ours"], rows[other])) for k, _, _ in keys}
            print(f"{'ratio':14}" + "".join(f"{ratio[k]:>10.2f}" for k, _, _ in keys)
                  + f"   ({label}, median of per-run ratios; latency: lower is better)")


if __name__ == "__main__":
    main()
