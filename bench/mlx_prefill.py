"""MLX prefill: the output layer on the last position only (what backends/mlx.py does) against the whole
forward's logits sliced afterwards (every position through the output layer), alternated: time and MLX's
peak memory, and the largest logit difference.

    python bench/mlx_prefill.py MLX_FOLDER --tokens 500 --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--tokens", type=int, default=500)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    from epicode_edge.backends.mlx import last_position_head

    model, _ = load(str(a.model))
    head = last_position_head(model)
    if head is None:
        raise SystemExit(f"{a.model}: not a model whose forward is head(model.model(x))")
    ids = mx.array([(1000 + i) % 30000 for i in range(a.tokens)])[None]

    def whole():
        return model(ids, cache=make_prompt_cache(model))[0, -1]

    def last():
        return head(model.model(ids, cache=make_prompt_cache(model))[:, -1:, :])[0, -1]

    x, y = whole(), last()
    mx.eval(x, y)
    print(f"max |logit difference| {mx.abs(x - y).max().item():.3g} ({mx.default_device()})")
    res: dict[str, list] = {"whole forward": [], "last position": []}
    for _ in range(a.runs):
        for name, f in zip(res, (whole, last)):
            mx.reset_peak_memory()
            t = time.perf_counter()
            mx.eval(f())
            res[name].append((time.perf_counter() - t, mx.get_peak_memory()))
    for name, v in res.items():
        print(f"{name:14s} prefill of {a.tokens} tokens: median {statistics.median(r[0] for r in v):.2f} s, "
              f"peak {statistics.median(r[1] for r in v) / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
