"""Tune mu and lambda for the demo family on its dev split (never the test split) and record the choice in
models/demo/demo.json, which `epicode-edge demo` reads.

    python models/demo/tune_demo.py [--work DIR]

Same as `epicode-edge tune --finetuned models/demo/finetuned --inferior models/demo/inferior
--dev models/demo/data/dev.jsonl -o DIR/bundle --with-inferior`, plus writing demo.json and the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from epicode_edge.apps.tune import DEFAULT_LAM_GRID, DEFAULT_MU_GRID, tune  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(".epicode-cache/demo-tune"))
    ap.add_argument("--mu-grid", default=",".join(map(str, DEFAULT_MU_GRID)))
    ap.add_argument("--lambda-grid", default=",".join(map(str, DEFAULT_LAM_GRID)))
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    def progress(stage, done, total):
        if done == total:
            print(f"  {stage}: done", flush=True)

    res = tune(HERE / "finetuned", HERE / "inferior", HERE / "data" / "dev.jsonl", args.work / "bundle",
               mu_grid=args.mu_grid, lam_grid=args.lambda_grid, with_inferior=True, work_dir=args.work,
               max_tokens=args.max_tokens, force=True, progress=progress, warn=lambda w: print("Warning:", w))
    print(res.table())
    settings = {"mu": res.mu, "lambda": res.lam, "alpha": res.alpha,
                "chosen_by": "epicode-edge tune on data/dev.jsonl (models/demo/tune_demo.py)",
                "dev_accuracy": {k: round(p.accuracy, 4) for k, p in res.points.items()}}
    (HERE / "demo.json").write_text(json.dumps(settings, indent=2) + "\n")
    (HERE / "tune_table.md").write_text(res.table(markdown=True) + "\n")
    print(f"mu = {res.mu:g}, lambda = {res.lam:g} -> {HERE / 'demo.json'}; bundle {res.bundle}")


if __name__ == "__main__":
    main()
