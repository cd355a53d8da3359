"""Decoding on MLX: EpiCoDe (expert + amateur) against mlx_lm's own greedy loop on the expert, same run.

    python bench/mlx_decode.py BUNDLE --runs 3 --max-tokens 24 --prompts-file bench/prompts/sort20.jsonl

Anchor: mlx_lm's `generate_step` (greedy) on the bundle's expert folder, the single-model loop mlx-lm users
run. Measured against it in the same process, interleaved run by run on the same prompt:
    epicode-naive/whole   amateur stepped on every token, its whole output layer (two full forwards per token)
    epicode-naive         the same, the amateur's output layer on the K plausible candidates only (the default)
    lazy-auto/whole       lazy amateur (no forward on forced picks), whole output layer
    lazy-auto             lazy amateur, candidate rows only (the default mode on MLX)
    expert-alone          our loop with lambda = 0 (our loop's own overhead against the anchor)
A ratio is the median over runs x prompts of a way's decode tokens/s over the anchor's on the same prompt in
the same run. Answers of each candidate-head row are compared with its whole-head row (same picks expected:
the K rows give the whole layer's values on MLX's CPU backend). On Linux MLX runs on the CPU (slow: this
measures the work saved, not Apple-silicon speed). Last, one amateur step alone: whole output layer, K rows
of it, none (the direct measure of what the candidate head saves per forward).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPTS = ["The quick brown fox", "Question: what is 17 + 25? Answer:", "def add(a, b):"]


def anchor_run(model, ids: list[int], max_tokens: int, eos: frozenset) -> dict:
    """mlx_lm greedy from a fresh cache: (ttft, decode tokens/s, tokens)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    n, t0, t_first, out = 0, time.perf_counter(), None, []
    for tok, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens):
        tok = int(tok)
        n += 1
        out.append(tok)
        if t_first is None:
            t_first = time.perf_counter()
        if tok in eos:
            break
    t_end = time.perf_counter()
    return {"ttft_s": t_first - t0, "tokens_per_s": (n - 1) / (t_end - t_first) if n > 1 else 0.0, "tokens": out}


def ours_run(rt, ids: list[int], max_tokens: int, **settings) -> dict:
    for b in (rt.expert, rt.amateur):
        b.truncate(0)  # every run prefills its prompt
    events = list(rt.stream_ids(ids, rt.settings(max_tokens=max_tokens, **settings)))
    st = events[-1].stats
    return {"ttft_s": st.ttft_s, "tokens_per_s": st.tokens_per_s, "skip_rate": st.skip_rate,
            "tokens": [e.token for e in events if e.token is not None]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path, help="a bundle with MLX folders")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--prompts-file", type=Path, default=None, help="JSONL with 'prompt' fields")
    ap.add_argument("--n-prompts", type=int, default=3)
    ap.add_argument("--step-reps", type=int, default=15, help="alternations of the amateur step measurement")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import mlx.core as mx

    from epicode_edge.runtime import load

    rt = load(args.bundle, backend="mlx")
    model = rt.expert._model  # the anchor runs mlx_lm on the very same model object (same weights, own cache)
    lam, alpha = rt.defaults.lam, rt.defaults.alpha
    texts = PROMPTS
    if args.prompts_file:
        texts = [json.loads(x)["prompt"] for x in args.prompts_file.read_text().splitlines() if x.strip()]
    texts = texts[:args.n_prompts]
    raw = not rt.expert.chat_template
    prompts = [rt.encode(t, raw=raw) for t in texts]
    print(f"MLX {mx.default_device()}, mlx {mx.__version__}; expert {rt.expert.path}; lambda {lam}, alpha {alpha}; "
          f"{args.runs} runs x {len(prompts)} prompts x {args.max_tokens} tokens; "
          f"amateur candidate head available: {rt.amateur.partial_head}")
    ways = {"epicode-naive/whole": {"lazy": False, "candidate_head": False},
            "epicode-naive": {"lazy": False},
            "lazy-auto/whole": {"candidate_head": False},
            "lazy-auto": {},
            "expert-alone": {"lam": 0.0}}
    for ids in prompts[:1]:  # warm-up
        anchor_run(model, ids, 4, rt.expert.eos_ids)
        ours_run(rt, ids, 4, lam=lam, alpha=alpha)
    rows = {"anchor": [], **{w: [] for w in ways}}
    differ = {"epicode-naive": 0, "lazy-auto": 0}
    for run in range(args.runs):
        for ids in prompts:
            rows["anchor"].append(anchor_run(model, ids, args.max_tokens, rt.expert.eos_ids))
            for name, kw in ways.items():
                rows[name].append(ours_run(rt, ids, args.max_tokens, **{"lam": lam, "alpha": alpha, **kw}))
            for name in differ:
                differ[name] += rows[name][-1]["tokens"] != rows[name + "/whole"][-1]["tokens"]
        print(f"  run {run + 1}/{args.runs}: " + ", ".join(
            f"{n} {statistics.median(r['tokens_per_s'] for r in rs[-len(prompts):]):.2f}" for n, rs in rows.items())
            + " tok/s")
    summary = {"device": str(mx.default_device()), "lam": lam, "alpha": alpha, "runs": args.runs,
               "prompts": len(prompts), "max_tokens": args.max_tokens, "ways": {}, "answers_differing": differ}
    print(f"\n{'':22}{'tok/s':>8}{'ratio':>8}{'ttft ms':>9}{'skip':>7}")
    for name, rs in rows.items():
        ratio = statistics.median(r["tokens_per_s"] / a["tokens_per_s"] for r, a in zip(rs, rows["anchor"]))
        fig = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs), "ratio": ratio,
               "ttft_ms": 1e3 * statistics.median(r["ttft_s"] for r in rs)}
        line = f"{name:22}{fig['tokens_per_s']:8.2f}{ratio:8.3f}{fig['ttft_ms']:9.0f}"
        if name != "anchor":
            fig["skip_rate"] = statistics.median(r["skip_rate"] for r in rs)
            line += f"{fig['skip_rate']:7.2f}"
        summary["ways"][name] = fig
        print(line)
    n = args.runs * len(prompts)
    print("answers differing from the whole-head row's: " + ", ".join(f"{k} {v}/{n}" for k, v in differ.items()))
    from decode import step_costs  # bench/decode.py's: the same alternation on llama.cpp

    summary["amateur_step_ms"] = step_costs(rt.amateur, prompts[0], args.step_reps)
    print("one amateur step (median of {n} alternations): whole output layer {whole:.1f} ms, candidate rows "
          "(K=4) {rows:.1f} ms, no output layer (an unread catch-up step) {none:.1f} ms".format(
              n=args.step_reps, **summary["amateur_step_ms"]))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    rt.close()


if __name__ == "__main__":
    main()
