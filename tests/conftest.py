import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Nothing downloads at run time: a missing local path must never be taken for a hub id.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite's own cache folder (demo bundles, the CPU-kernel probe's result): never the user's.
if "EPICODE_EDGE_CACHE" not in os.environ:
    os.environ["EPICODE_EDGE_CACHE"] = tempfile.mkdtemp(prefix="epicode-test-cache-")
    atexit.register(shutil.rmtree, os.environ["EPICODE_EDGE_CACHE"], ignore_errors=True)

sys.path.insert(0, str(Path(__file__).parent))


def pytest_sessionstart(session):
    """The engine smoke check first, in a child process (engine_guard.py)."""
    if os.environ.get("EPICODE_EDGE_SKIP_SMOKE") != "1":  # for quick numpy-only runs while developing
        from engine_guard import guard

        guard()
