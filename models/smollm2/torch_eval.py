"""The paper's tune (dev) and four-row eval (test) for the SmolLM2 family, computed in torch by teacher forcing.

    python models/smollm2/torch_eval.py --family models/smollm2 [--cache DIR] [--out results_torch.json]

Why: on 2 shared CPU cores the runtime's own `tune` + `eval` (llama.cpp, one sequence at a time) need hours
for 300 dev x ~20 grid points and 600 test x 4 methods. Greedy exact match can be computed exactly from one
forward pass per item and setting: an item is right when, with the gold answer as the prefix, the greedy pick
at every answer position (the answer's tokens and the closing <|im_end|>) is the gold token. For contrastive
decoding the pick is the one of docs/decoding.md#the-pick: mask `le >= log(alpha) + max(le)`, then argmax of
`(1 + lambda) * le - lambda * la`. It differs from generating only where a different tokenization spells
the same string. Weights: the dequantized Q4_1 base in float32 plus the adapters' deltas,
W = W0 + (1 + mu) dW_finetuned - mu dW_inferior (expert), W0 + dW_finetuned (amateur / finetuned),
W0 + dW_inferior (inferior).

Procedure (the same rules as `epicode-edge tune`): mu over {0} and MU_GRID alone on dev (ties: smaller mu);
lambda over LAM_GRID at the best positive mu; the pick is the best of finetuned, that mu alone and its lambda
points (ties: the simpler); the CD-only row's own lambda over LAM_GRID (finetuned against inferior). Then
the test split: finetuned, extrapolation only (chosen mu, or the best positive mu when mu = 0 won),
CD only (its lambda), EpiCoDe (chosen mu and lambda), with Wilson intervals and exact McNemar tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import make_data  # noqa: E402
import recipe  # noqa: E402

from epicode_edge.apps import tasks  # noqa: E402  (pure functions: wilson, mcnemar_exact)

MU_GRID = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5)  # as epicode_edge.apps.tune.DEFAULT_MU_GRID
LAM_GRID = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)  # as epicode_edge.apps.tune.DEFAULT_LAM_GRID
ALPHA = 0.1  # the paper's


def adapter_deltas(folder: Path, torch) -> tuple[dict, int]:
    """({hf module name: scale * B @ A}, lowest adapted layer) of a PEFT LoRA folder."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    w = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for k, a in w.items():
        if ".lora_A." not in k:
            continue
        name = k.split(".lora_A.")[0].replace("base_model.model.", "", 1)
        b = w[k.replace(".lora_A.", ".lora_B.")]
        out[name] = scale * (b.float() @ a.float())  # (out, in)
    return out, min(cfg.get("layers_to_transform") or [0])


class Weights:
    """Sets the top layers' weights to W0 + sum(coef * delta) for a named setting."""

    def __init__(self, hf, d_ft, d_inf, torch):
        self.torch, self.d_ft, self.d_inf = torch, d_ft, d_inf
        self.mods = {n: m for n, m in hf.named_modules() if n in d_ft}
        self.w0 = {n: m.weight.detach().clone() for n, m in self.mods.items()}

    def set(self, ft: float, inf: float) -> None:
        with self.torch.no_grad():
            for n, m in self.mods.items():
                m.weight.copy_(self.w0[n] + ft * self.d_ft[n] + inf * self.d_inf[n])


def setting(kind: str, mu: float = 0.0) -> tuple[float, float]:
    return {"finetuned": (1.0, 0.0), "inferior": (0.0, 1.0), "expert": (1.0 + mu, -mu)}[kind]


def logprobs(inner, lm_head, n_bottom, cached, idx, torch):
    logits, gold = recipe.top_logits(inner, lm_head, n_bottom, cached, idx, torch)
    return [torch.log_softmax(x, -1) for x in logits], gold


def greedy_ok(le, gold) -> bool:
    return bool((le.argmax(-1) == gold).all())


def cd_ok(le, la, gold, lam: float, alpha: float = ALPHA) -> bool:
    """Contrastive greedy pick at every answer position equals the gold token (docs/decoding.md#the-pick)."""
    import torch

    keep = le >= math.log(alpha) + le.max(-1, keepdim=True).values  # (A, V)
    s = torch.where(keep, (1 + lam) * le - lam * la, torch.full_like(le, -math.inf))
    return bool((s.argmax(-1) == gold).all())


def sweep(model, cached, settings: dict, rules: dict, batch: int, torch) -> dict[str, list[bool]]:
    """rules: name -> (needed setting names, fn(logprobs by setting, gold) -> bool); every rule on every item."""
    inner, lm_head, n_bottom, weights = model
    out = {r: [] for r in rules}
    with torch.inference_mode():
        for i in range(0, len(cached.rows), batch):
            idx = list(range(i, min(i + batch, len(cached.rows))))
            lp, gold = {}, None
            for name, coefs in settings.items():
                weights.set(*coefs)
                lp[name], gold = logprobs(inner, lm_head, n_bottom, cached, idx, torch)
            for r, fn in rules.items():
                out[r] += [fn({k: v[j] for k, v in lp.items()}, gold[j]) for j in range(len(idx))]
    return out


def row(name: str, correct: list[bool], base: list[bool] | None) -> dict:
    k, n = sum(correct), len(correct)
    lo, hi = tasks.wilson(k, n)
    r = {"name": name, "k": k, "n": n, "accuracy": k / n, "ci": [lo, hi]}
    if base is not None and correct is not base:
        losses, wins = tasks.discordant(base, correct)
        r.update(delta=(k - sum(base)) / n, wins=wins, losses=losses, p=tasks.mcnemar_exact(wins, losses))
    return r


def table(rows: list[dict]) -> str:
    head = "| method | accuracy | 95% CI | vs finetuned | wins/losses | McNemar p |\n|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        d = (f"{100 * r['delta']:+.1f} pts | {r['wins']}/{r['losses']} | {r['p']:.3g}" if "delta" in r else " | | ")
        lines.append(f"| {r['name']} | {100 * r['accuracy']:.1f}% ({r['k']}/{r['n']}) | "
                     f"{100 * r['ci'][0]:.1f}-{100 * r['ci'][1]:.1f} | {d} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", type=Path, default=HERE)
    ap.add_argument("--cache", type=Path, default=None, help="The recipe's --cache folder (bottom-layer outputs).")
    ap.add_argument("--out", type=Path, default=HERE / "runs" / "results_torch.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--test", type=Path, default=None, help="Test JSONL [default: the shipped test split].")
    ap.add_argument("--limit", type=int, default=None, help="Only the first N dev and test items (a smoke run).")
    ap.add_argument("--fill-only", action="store_true", help="Only compute and keep the bottom-layer cache (--cache).")
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    torch.set_num_threads(args.threads)
    gguf = recipe.base_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    hf.requires_grad_(False)
    d_ft, n_bottom = adapter_deltas(args.family / "finetuned", torch)
    d_inf, n_bottom_inf = adapter_deltas(args.family / "inferior", torch)
    assert n_bottom == n_bottom_inf and set(d_ft) == set(d_inf)
    inner, lm_head = hf.model, hf.lm_head
    data = make_data.splits()
    dev = recipe.Cached(data["dev"][: args.limit], tok)
    test_rows = data["test"] if args.test is None else [json.loads(x) for x in args.test.read_text().splitlines()
                                                        if x.strip()]
    test = recipe.Cached(test_rows[: args.limit], tok)
    stash = next(iter(sorted(args.cache.glob(f"bottom-{n_bottom}-*.pt"))), None) if args.cache else None
    if stash is not None and args.limit is None:
        _, dev.states = torch.load(stash)
    else:
        dev.fill(inner, n_bottom, torch)
    import hashlib

    key = hashlib.sha256("\n".join(r["prompt"] + "\t" + r["answer"] for r in test.rows).encode()).hexdigest()[:12]
    test_stash = args.cache / f"test-{n_bottom}-{key}-{args.threads}.pt" if args.cache else None
    if test_stash is not None and test_stash.is_file():
        test.states = torch.load(test_stash)
    else:
        test.fill(inner, n_bottom, torch)
        if test_stash is not None:
            torch.save(test.states, test_stash.with_suffix(".tmp"))
            test_stash.with_suffix(".tmp").replace(test_stash)
    if args.fill_only:
        print(f"cached the test items' bottom layers in {test_stash}")
        return
    print(f"bottom {n_bottom} layers cached for {len(dev.rows)} dev / {len(test.rows)} test ({time.time() - t0:.0f} s)",
          flush=True)
    model = (inner, lm_head, n_bottom, Weights(hf, d_ft, d_inf, torch))

    # dev 1-2: finetuned and every mu alone
    settings = {"finetuned": setting("finetuned")} | {f"mu={m:g}": setting("expert", m) for m in MU_GRID}
    rules = {k: (lambda lp, g, k=k: greedy_ok(lp[k], g)) for k in settings}
    dev_res = sweep(model, dev, settings, rules, args.batch, torch)
    acc = {k: sum(v) / len(v) for k, v in dev_res.items()}
    best_pos = max(MU_GRID, key=lambda m: (acc[f"mu={m:g}"], -m))
    print(f"dev mu sweep: {json.dumps({k: round(v, 4) for k, v in acc.items()})}", flush=True)
    # dev 3-4: lambda at the best positive mu; the CD-only row's own lambda
    settings = {"expert": setting("expert", best_pos), "finetuned": setting("finetuned"),
                "inferior": setting("inferior")}
    rules = {f"mu={best_pos:g},lambda={lam:g}": (lambda lp, g, lam=lam: cd_ok(lp["expert"], lp["finetuned"], g, lam))
             for lam in LAM_GRID}
    rules |= {f"cd,lambda={lam:g}": (lambda lp, g, lam=lam: cd_ok(lp["finetuned"], lp["inferior"], g, lam))
              for lam in LAM_GRID}
    rules["inferior"] = lambda lp, g: greedy_ok(lp["inferior"], g)
    dev_res |= sweep(model, dev, settings, rules, args.batch, torch)
    acc = {k: sum(v) / len(v) for k, v in dev_res.items()}
    cands = ["finetuned", f"mu={best_pos:g}"] + [f"mu={best_pos:g},lambda={lam:g}" for lam in LAM_GRID]
    pick = max(cands, key=lambda k: (acc[k], -cands.index(k)))
    mu = 0.0 if pick == "finetuned" else best_pos
    lam = float(pick.split("lambda=")[1]) if "lambda=" in pick else 0.0
    cd_lam = max(LAM_GRID, key=lambda x: (acc[f"cd,lambda={x:g}"], -x))
    dev_rows = [row(k, dev_res[k], dev_res["finetuned"]) for k in dev_res]
    print(table(dev_rows), flush=True)
    print(f"chosen: mu = {mu:g}, lambda = {lam:g} ({pick}); CD-only lambda = {cd_lam:g}", flush=True)

    # test: the four rows
    mu_t = mu if mu > 0 else best_pos
    settings = {"expert": setting("expert", mu_t), "finetuned": setting("finetuned"), "inferior": setting("inferior")}
    rules = {"finetuned": lambda lp, g: greedy_ok(lp["finetuned"], g),
             f"extrapolation only (mu={mu_t:g})": lambda lp, g: greedy_ok(lp["expert"], g),
             f"CD only (lambda={cd_lam:g})": lambda lp, g: cd_ok(lp["finetuned"], lp["inferior"], g, cd_lam),
             f"EpiCoDe (mu={mu_t:g}, lambda={lam:g})": lambda lp, g: cd_ok(lp["expert"], lp["finetuned"], g, lam),
             "inferior (epoch 1)": lambda lp, g: greedy_ok(lp["inferior"], g)}
    test_res = sweep(model, test, settings, rules, args.batch, torch)
    test_rows = [row(k, v, test_res["finetuned"]) for k, v in test_res.items()]
    print(table(test_rows), flush=True)
    by_type = {t: {k: sum(c for c, r in zip(v, test.rows) if r.get("type") == t) /
                   max(1, sum(r.get("type") == t for r in test.rows)) for k, v in test_res.items()}
               for t in make_data.TYPES}
    out = {"method": "torch teacher-forced greedy exact match (models/smollm2/torch_eval.py)",
           "dev": {"rows": dev_rows, "best_positive_mu": best_pos, "chosen": {"mu": mu, "lambda": lam, "pick": pick},
                   "cd_lambda": cd_lam},
           "test": {"data": str(args.test or "data/test.jsonl"), "rows": test_rows, "by_type": by_type,
                    "correct": {k: [int(c) for c in v] for k, v in test_res.items()}},
           "seconds": round(time.time() - t0, 1)}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
