"""The engine smoke check a test session runs first (conftest.py), so that an engine crash (SIGILL from
llama.cpp's AMX kernels on some VMs) stops the suite with one line instead of killing pytest mid-run."""

from __future__ import annotations

import pytest

from epicode_edge.backends import cpu_kernels


def guard(smoke=cpu_kernels.smoke_check) -> None:
    """Run `smoke` (a child process: returns a cpu_kernels.ProbeResult); on failure stop the session (exit 3)."""
    r = smoke()
    if r.ok:
        return
    mode, _ = cpu_kernels.current_mode()
    hint = (f"{cpu_kernels.ENV}=off runs llama.cpp without its extra CPU kernels (AMX, repacked weights)"
            if mode != "off" else "the plain kernels fail too: check the llama-cpp-python build")
    pytest.exit(f"llama.cpp engine smoke check failed ({r.detail}) with CPU kernel setting '{mode}'; "
                f"stopping before the tests. {hint}", returncode=3)
