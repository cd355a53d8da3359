"""Benchmark batched decoding: N requests decoded together vs the same N one after another.

    python bench/batch.py                          # 8 requests, 64 tokens each, Q8_0, 5 runs
    python bench/batch.py --parallel 4 --quant F16 --runs 3 --max-tokens 32
    python bench/batch.py --hidden 256 --layers 4  # a smaller model
    python bench/batch.py --backend mlx --hidden 256 --layers 4 --runs 3
    python bench/batch.py --n-gpu-layers -1        # CUDA/Metal build of llama-cpp-python: all layers offloaded
    python bench/batch.py --bundle B --quant Q8_0 --whole-head-row   # a bundle; also batched with the amateur's
                                                                      # whole output layer (candidate_head=False)
    python bench/batch.py --bundle runs/S --parallel 4 --requests 8 --max-tokens 32 --load --runs 2
        # idle and loaded rows (loaded: two busy processes started and stopped by the bench, bench/busy.py):
        # one at a time (--parallel 1), batched (overlap auto, --batch-steps auto), batched with every step in
        # one engine call (--batch-steps grouped), batched --no-overlap, and llama-cpp-python alone on the
        # expert GGUF (one model, one request at a time), as ratios in the same run
    python bench/batch.py --bundle runs/S --engine-rows --parallel 4
        # the engine alone: one-token decodes of k sequences in one llama_decode vs k calls of one (what
        # --batch-steps auto measures as it decodes), at the threads batched decoding runs with

The model pair is a generated ~88M-parameter Llama (hidden 768, 12 layers, 12 heads / 4 KV heads, MLP 2048,
random weights; finetuned and inferior differ by a little noise) converted into an EpiCoDe bundle in a
temporary folder (or --work DIR, reused between runs). Both ways use the same loaded Runtime, the same
prompts and greedy settings; every run checks that the batched outputs equal the sequential ones token for
token. Throughput = completion tokens / wall time; the ratio is of the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import llama_cpp  # noqa: F401  (before numpy: a CUDA build segfaulted at model load otherwise)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "What is 17 + 25?", "The quick brown fox", "Multiply 3 by 4, then add 5.", "def add(a, b):",
    "Law, math and logic: if all A are B", "Café crème, naïve façade", "0123456789 3.14159", "Zürich, Ångström",
    "Question: what is 6 * 7?", "Emoji: 😀 🚀", "leading spaces, tabs", "東京は日本の首都です。",
]


def make_bundle(work: Path, quant: str, hidden: int, layers: int, backend: str) -> Path:
    from factory import make_pair

    from epicode_edge.converters.convert import convert

    to = ("gguf", "mlx") if backend == "mlx" else ("gguf",)
    out = work / (f"bundle-{hidden}x{layers}-{quant}" + ("-mlx" if backend == "mlx" else ""))
    if (out / "epicode.json").exists():
        return out
    heads = max(hidden // 64, 1)
    ft, inf = make_pair(work / f"pair-{hidden}x{layers}", arch="llama", seed=11, hidden=hidden, layers=layers,
                        heads=heads, kv_heads=max(heads // 3, 1), intermediate=hidden * 8 // 3)
    return convert(ft, inf, out, mu=0.5, to=to, quant=(quant,)).path


def n_params(hidden: int, layers: int) -> float:
    kv = max(hidden // 64 // 3, 1) * 64
    inter = hidden * 8 // 3
    return (2 * 384 * hidden + layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter)) / 1e6


def one_run(rt, prompts, parallel: int, max_tokens: int, whole_head: bool = False,
            run: int = 0) -> tuple[float, float, int, float]:
    """(sequential tok/s, batched tok/s, tokens, batched tok/s with the amateur's whole output layer or nan);
    with whole_head the two batched ways alternate which goes first (by run)."""
    from epicode_edge.apps.batch import generate_batch

    t = time.perf_counter()
    seq = [rt.generate(p, max_tokens=max_tokens) for p in prompts]
    t_seq = time.perf_counter() - t
    timed = {}
    order = [True] if not whole_head else [True, False] if run % 2 == 0 else [False, True]
    for cand in order:
        t = time.perf_counter()
        timed[cand] = generate_batch(rt, prompts, parallel=parallel, max_tokens=max_tokens, candidate_head=cand), \
            time.perf_counter() - t
    (bat, t_bat), t_whole = timed[True], timed[False][1] if whole_head else float("nan")
    if whole_head and [r.tokens for r in timed[False][0]] != [r.tokens for r in bat]:
        print("  WARNING: the whole-head batched outputs differ from the candidate-head ones")
    if [r.tokens for r in seq] != [r.tokens for r in bat]:
        diff = sum(a.tokens != b.tokens for a, b in zip(seq, bat))
        print(f"  WARNING: {diff} of {len(prompts)} batched outputs differ from the sequential ones")
    tokens = sum(r.completion_tokens for r in seq)
    return tokens / t_seq, tokens / t_bat, tokens, tokens / t_whole


def engine_ceiling(rt, parallel: int, repeats: int = 10) -> float:
    """The engine alone: tokens/s of one decode of `parallel` sequences (one token each) over tokens/s of
    one single-sequence decode: the most batching can give on this machine (EpiCoDe adds its own work)."""
    from epicode_edge.backends.multiseq import open_multiseq

    prompt = rt.encode(PROMPTS[0])
    with open_multiseq(rt.expert, parallel) as ms:
        ms.decode([(s, prompt) for s in range(parallel)])
        one, many = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            ms.decode([(0, [5])])
            one.append(time.perf_counter() - t)
            t = time.perf_counter()
            ms.decode([(s, [5]) for s in range(parallel)])
            many.append(time.perf_counter() - t)
            for s in range(parallel):
                ms.truncate(s, len(prompt))
    return parallel * statistics.median(one) / statistics.median(many)


def engine_rows(rt, parallel: int, repeats: int = 15) -> None:
    """One-token decodes of k sequences: one engine call for all (grouped) vs k calls of one (split), medians of
    `repeats`, at the thread count of batched decoding (half the cores when the two models overlap)."""
    from epicode_edge.backends.multiseq import StepGrouping, open_multiseq

    prompt = rt.encode(PROMPTS[0])
    with open_multiseq(rt.expert, parallel) as ms:
        ms.steps = StepGrouping("grouped")  # decode() as asked: k entries in one call
        ms.share_cores(2 if rt.batch_overlaps() else 1)
        print(f"engine alone (expert, threads {getattr(ms, 'threads', '-')}), one token for each of k sequences:")
        ms.decode([(s, prompt) for s in range(parallel)])
        for k in sorted({1, 2, 4, parallel} & set(range(1, parallel + 1))):
            one, many = [], []
            for _ in range(repeats):
                for s in range(k):
                    t = time.perf_counter()
                    ms.decode([(s, [5])])
                    one.append(time.perf_counter() - t)
                    ms.truncate(s, len(prompt))
                t = time.perf_counter()
                ms.decode([(s, [5]) for s in range(k)])
                many.append(time.perf_counter() - t)
                for s in range(k):
                    ms.truncate(s, len(prompt))
            a, b = k * statistics.median(one), statistics.median(many)
            print(f"  k={k:2}: {k} calls of one {a * 1e3:6.1f} ms, one call of {k} {b * 1e3:6.1f} ms  "
                  f"(grouped / split time: {b / a:.2f})")


def load_rows(rt, prompts, parallel: int, max_tokens: int, runs: int, expert_gguf: Path | None) -> None:
    """Idle and loaded rows: wall time of each way (median of `runs`, alternated), and its throughput over
    one at a time and over llama-cpp-python alone (tokens/s ratios)."""
    from busy import busy_load, load_average

    from epicode_edge.apps.batch import generate_batch

    llm = None
    if expert_gguf is not None:
        from llama_cpp import Llama

        llm = Llama(model_path=str(expert_gguf), n_ctx=512, verbose=False)  # its own default threads
    ids = [rt.encode(p) for p in prompts]

    def alone() -> int:
        return sum(llm.create_completion(i, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0)
                   ["usage"]["completion_tokens"] for i in ids)

    from epicode_edge.backends.multiseq import StepGrouping

    def grouped():  # every step's tokens in one engine call (--batch-steps grouped), measured in the same run
        saved = rt.expert.batch_steps, rt.amateur.batch_steps
        rt.expert.batch_steps, rt.amateur.batch_steps = StepGrouping("grouped"), StepGrouping("grouped")
        rt.release_batched()  # batched forms take the setting when made
        try:
            return generate_batch(rt, prompts, parallel=parallel, max_tokens=max_tokens)
        finally:
            rt.release_batched()
            rt.expert.batch_steps, rt.amateur.batch_steps = saved

    ways = {"one at a time (--parallel 1)": lambda: generate_batch(rt, prompts, parallel=1, max_tokens=max_tokens),
            f"--parallel {parallel} (overlap auto: {rt.batch_overlaps()})":
                lambda: generate_batch(rt, prompts, parallel=parallel, max_tokens=max_tokens),
            f"--parallel {parallel} --batch-steps grouped": grouped,
            f"--parallel {parallel} --no-overlap":
                lambda: generate_batch(rt, prompts, parallel=parallel, max_tokens=max_tokens, overlap=False)}
    if llm is not None:
        ways["llama-cpp-python alone (expert)"] = alone
    ways["one at a time (--parallel 1)"]()  # warm-up
    ways[f"--parallel {parallel} (overlap auto: {rt.batch_overlaps()})"]()  # warm-up (auto times both ways)
    for cond, n_busy in (("idle", 0), ("loaded", 2)):
        with busy_load(n_busy):
            before = load_average()
            times = {w: [] for w in ways}
            tokens = {}
            for r in range(runs):
                for w in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
                    t = time.perf_counter()
                    out = ways[w]()
                    times[w].append(time.perf_counter() - t)
                    tokens[w] = out if isinstance(out, int) else sum(x.completion_tokens for x in out)
            after = load_average()
        tps = {w: tokens[w] / statistics.median(v) for w, v in times.items()}
        one = tps["one at a time (--parallel 1)"]
        anchor = tps.get("llama-cpp-python alone (expert)")
        print(f"{cond} ({n_busy} busy processes; before: {before}; after: {after}):")
        for w, v in times.items():
            print(f"  {w:38} {statistics.median(v):6.2f} s {tps[w]:7.1f} tok/s  x{tps[w] / one:.2f} vs one at a time"
                  + (f"  x{tps[w] / anchor:.2f} vs llama-cpp-python alone" if anchor else "")
                  + f"  (runs: {', '.join(f'{x:.1f}' for x in v)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parallel", type=int, default=8, help="concurrent requests (also the request count)")
    ap.add_argument("--requests", type=int, default=None, help="requests per run (default: --parallel)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quant", default="Q8_0")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--backend", choices=("llama.cpp", "mlx"), default="llama.cpp")
    ap.add_argument("--work", type=Path, default=None, help="keep the generated bundle here")
    ap.add_argument("--bundle", type=Path, default=None, help="an existing bundle instead of a generated model")
    ap.add_argument("--prompts-file", type=Path, default=None, help="JSONL with 'prompt' fields (cycled)")
    ap.add_argument("--load", action="store_true",
                    help="idle and loaded rows instead (two busy processes beside it; see the docstring)")
    ap.add_argument("--engine-rows", action="store_true",
                    help="only the engine: one-token decodes of k sequences, one call vs k calls (see the docstring)")
    ap.add_argument("--whole-head-row", action="store_true",
                    help="also batched with the amateur's whole output layer (candidate_head=False), each run")
    a = ap.parse_args()

    from epicode_edge.runtime import load

    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        bundle = a.bundle or make_bundle(work, a.quant, a.hidden, a.layers, a.backend)
        texts = PROMPTS
        if a.prompts_file:
            import json

            texts = [json.loads(x)["prompt"] for x in a.prompts_file.read_text().splitlines() if x.strip()]
        n = a.requests or a.parallel
        prompts = (texts * (n // len(texts) + 1))[:n]
        threads = a.threads or (None if a.load or a.engine_rows else os.cpu_count())  # the engine's own default
        opts = dict(n_threads=threads, n_gpu_layers=a.n_gpu_layers) if a.backend == "llama.cpp" else {}
        if a.backend == "llama.cpp":
            opts["quant"] = a.quant
        with load(bundle, backend=a.backend, n_ctx=512, **opts) as rt:
            what = (f"{a.quant}, llama.cpp, {threads} threads, n_gpu_layers {a.n_gpu_layers}"
                    if a.backend == "llama.cpp" else "MLX")
            model = (f"bundle {a.bundle}" if a.bundle else
                     f"llama {n_params(a.hidden, a.layers):.1f}M params ({a.hidden} hidden, {a.layers} layers)")
            print(f"model: {model}, {what}")
            if a.engine_rows:
                return engine_rows(rt, a.parallel)
            if a.load:
                from epicode_edge.converters.bundle import open_bundle

                try:
                    expert = open_bundle(bundle).gguf("expert", a.quant) if a.backend == "llama.cpp" else None
                except Exception as e:  # e.g. a shared-base (LoRA) bundle: no expert GGUF of its own
                    print(f"llama-cpp-python alone: not measured ({e})")
                    expert = None
                print(f"{n} requests x {a.max_tokens} tokens max, greedy EpiCoDe; {a.runs} runs per row")
                return load_rows(rt, prompts, a.parallel, a.max_tokens, a.runs, expert)
            print(f"{a.parallel} requests x {a.max_tokens} tokens max, greedy EpiCoDe; {a.runs} runs (+1 warm-up)")
            one_run(rt, prompts[:2], 2, 4)  # warm-up
            seq, bat, whole = [], [], []
            for i in range(a.runs):
                s, b, n, w = one_run(rt, prompts, a.parallel, a.max_tokens, a.whole_head_row, i)
                seq.append(s)
                bat.append(b)
                whole.append(w)
                print(f"  run {i + 1}: {n} tokens; one after another {s:7.1f} tok/s, batched {b:7.1f} tok/s, "
                      f"x{b / s:.2f}" + (f"; batched, whole output layer {w:7.1f} tok/s" if a.whole_head_row else ""))
            ceiling = engine_ceiling(rt, a.parallel)
    ms, mb = statistics.median(seq), statistics.median(bat)
    print(f"median: one after another {ms:.1f} tok/s, batched ({a.parallel} at once) {mb:.1f} tok/s")
    print(f"ratio (batched / one after another, medians): {mb / ms:.2f}")
    if a.whole_head_row:
        print(f"batched with the amateur's whole output layer: {statistics.median(whole):.1f} tok/s; candidate head "
              f"/ whole (median of per-run ratios): {statistics.median(b / w for b, w in zip(bat, whole)):.3f}")
    print(f"engine ceiling ({a.backend} alone, one decode of {a.parallel} sequences vs one of 1, tokens/s): "
          f"{ceiling:.2f}")


if __name__ == "__main__":
    main()
