"""The shipped SmolLM2 family's scripts (models/smollm2/*.py) imported as modules for tests."""

import importlib.util
import sys
from pathlib import Path

FAMILY = Path(__file__).resolve().parents[1] / "models" / "smollm2"


def load_family_script(name: str, tag: str = ""):
    """models/smollm2/NAME.py as a module (its folder on sys.path while it imports, as when run as a script)."""
    spec = importlib.util.spec_from_file_location(f"smollm2_{name}{tag}", FAMILY / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(FAMILY))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(FAMILY))
    return mod
