"""GGUF -> GGUF with same-type tensors copied (the default) against every tensor encoded again, in one process,
alternated run by run (the machine's drift cancels): seconds and whether the output bytes are the same.

    python bench/copy_ab.py model.Q8_0.gguf            # the file as both checkpoints, mu 0.3, --quant Q8_0
    python bench/copy_ab.py model.gguf --quant F16 --runs 8
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted((folder / "gguf").glob("*.gguf")):
        h.update(f.read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--quant", default="Q8_0")
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--mu", type=float, default=0.3)
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    from epicode_edge.converters.convert import convert
    from epicode_edge.converters.gguf import GGUFCopySink

    copy = GGUFCopySink.stores_as
    times, digests = {"copied": [], "encoded": []}, {}
    with tempfile.TemporaryDirectory(prefix="epicode-copy-ab-") as tmp:
        convert(a.gguf, a.gguf, Path(tmp) / "warm-up", mu=a.mu, to="gguf", quant=a.quant)  # first-use costs
        for _ in range(a.runs):
            for mode in times:  # the benchmark's switch: a sink that never stores a tensor as its input's type
                GGUFCopySink.stores_as = copy if mode == "copied" else (lambda self, name, stored_type: False)
                out = Path(tmp) / mode
                shutil.rmtree(out, ignore_errors=True)
                t = time.perf_counter()
                convert(a.gguf, a.gguf, out, mu=a.mu, to="gguf", quant=a.quant)
                times[mode].append(time.perf_counter() - t)
                digests[mode] = digest(out)
    GGUFCopySink.stores_as = copy
    for mode, v in times.items():
        print(f"{mode:8s} median {statistics.median(v):.2f} s  runs {', '.join(f'{x:.2f}' for x in v)}")
    print("same output bytes" if digests["copied"] == digests["encoded"] else "output bytes differ (the input's "
          "blocks are not what llama.cpp's encoder makes of their values: the copy keeps them as stored)")


if __name__ == "__main__":
    main()
