"""eval one item at a time vs `--parallel N`: seconds per row, medians over alternated runs, and the ratio.

    python bench/eval_parallel.py --bundle B --data models/smollm2/data/test.jsonl --limit 60 --parallel 4
    python bench/eval_parallel.py --bundle B --data D --quant F16 --runs 5 --methods finetuned,epicode

Each run scores the same items with evaluate() (apps/eval.py) twice, parallel 1 and parallel N, in alternating
order, and checks that both give the same answers; printed per row: the median seconds of each way and
one-at-a-time / batched (above 1: batching is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import llama_cpp  # noqa: F401  (before numpy: a CUDA build segfaulted at model load otherwise)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--extract", default="exact")
    ap.add_argument("--methods", default="finetuned,extrapolation,epicode")
    ap.add_argument("--quant", default=None)
    a = ap.parse_args()

    from epicode_edge.apps.eval import evaluate

    kw = dict(limit=a.limit, max_tokens=a.max_tokens, extract=a.extract, methods=a.methods,
              **({"quant": a.quant} if a.quant else {}))
    secs: dict[tuple[str, int], list[float]] = {}
    for run in range(a.runs):
        texts = {}
        for p in ((1, a.parallel) if run % 2 == 0 else (a.parallel, 1)):
            r = evaluate(a.bundle, a.data, parallel=p, **kw)
            texts[p] = {m: x.texts for m, x in r.results.items()}
            for m, x in r.results.items():
                secs.setdefault((m, p), []).append(x.seconds)
        differ = sum(u != v for m in texts[1] for u, v in zip(texts[1][m], texts[a.parallel][m]))
        print(f"run {run + 1}: " + ", ".join(f"{m} {secs[m, 1][-1]:.2f} s / {secs[m, a.parallel][-1]:.2f} s"
                                            for m in texts[1])
              + (f"  ({differ} answers differ)" if differ else ""))
    print(f"{a.limit} items, medians of {a.runs} runs, one at a time vs --parallel {a.parallel}:")
    for m in dict.fromkeys(k for k, _ in secs):
        one, many = statistics.median(secs[m, 1]), statistics.median(secs[m, a.parallel])
        print(f"  {m:14} {one:6.2f} s  {many:6.2f} s  x{one / many:.2f}")


if __name__ == "__main__":
    main()
