"""A fixed synthetic load for the benchmarks' "loaded" rows: busy processes beside the measured one.

    with busy_load(2):      # two `python -c "while True: pass"` children, killed on exit (also on Ctrl-C)
        ...                 # or on SIGTERM: the handler turns it into SystemExit so the children go too
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time


@contextlib.contextmanager
def busy_load(n: int = 2):
    if n <= 0:
        yield []
        return
    old = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5)  # let them reach the CPU before measuring
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        signal.signal(signal.SIGTERM, old)


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (5 min {five:.2f}) on {os.cpu_count()} cores"
