"""Resident memory of a loaded bundle.

    python bench/memory.py                          # ~76M-param Llama, Q8_0, n_ctx 512 and 2048, 5 runs each
    python bench/memory.py --quant Q4_K_M --runs 3 --n-ctx 4096 --kv-heads 12
    python bench/memory.py --hidden 1536 --intermediate 4096   # ~300M params
    python bench/memory.py --work runs/mem --keep   # keep (and reuse) the generated models and bundles

Two bundles of the same EpiCoDe pair, where finetuned and inferior are LoRA adapters (rank 16 on q/k/v/o and
the MLP) over one base model (hidden 768, 12 layers, 12 heads with 4 KV heads (GQA, as current Llama/Qwen
models), MLP 2048; untied 384-token vocabulary):

    two-model    convert --merge: expert and amateur GGUFs (each a full model)
    shared-base  one base GGUF + lora/finetuned.gguf + lora/inferior.gguf; one llama_model, two contexts

Each measurement is a fresh child process: import epicode_edge and llama_cpp, read /proc/self/status
(baseline), runtime.load() the bundle, generate 16 greedy tokens from a ~40-token prompt (every weight page
touched, both KV caches in use), read /proc/self/status again. Reported, as loaded minus baseline (the
interpreter and libraries are not the bundle's): VmRSS (all resident), RssAnon (private: KV caches, compute
buffers, repacked weights) and RssFile (pages of the memory-mapped model files); medians over runs.

Goals: shared-base RSS <= 0.6 x two-model RSS (item 3); a loaded bundle's RSS <= 1.15 x (its model files +
the KV caches of its two contexts) (item 4; KV = 2 contexts x n_layer x n_ctx x n_kv_embd x 2 (K, V) x 2 B f16).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PROMPT = ("Question: a farmer has 17 sheep and buys 25 more, then sells 9. How many sheep are left? "
          "Think step by step, then answer.")
MB = 1 << 20


# ---------------------------------------------------------------------------------------------- child

def proc_status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def child(bundle: str, n_ctx: int, threads: int) -> None:
    import llama_cpp  # noqa: F401 - the library's own memory belongs to the baseline

    from epicode_edge.runtime import load

    before = proc_status()
    rt = load(bundle, n_ctx=n_ctx, n_threads=threads)
    res = rt.generate(PROMPT, raw=True, max_tokens=16, lazy=False)
    after = proc_status()
    print(json.dumps({"before": before, "after": after, "n_ctx": rt.expert.n_ctx,
                      "tokens": res.prompt_tokens + res.completion_tokens}))
    rt.close()


# ---------------------------------------------------------------------------------------------- parent

def make_models(work: Path, quant: str, rank: int, shape: dict) -> tuple[Path, Path, dict]:
    """(shared-base bundle, two-model bundle, HF config), made once per work folder, shape and quant."""
    from epicode_edge.converters.lora import convert_lora
    from factory import make_hf_model, make_lora_pair

    work = work / ("-".join(f"{k}{v}" for k, v in shape.items()) + f"-r{rank}")
    base = work / "base"
    if not (base / "config.json").is_file():
        make_hf_model(base, arch="llama", seed=7, **shape)
    ft, inf = work / "adapters" / "finetuned", work / "adapters" / "inferior"
    if not (inf / "adapter_model.safetensors").is_file():
        make_lora_pair(work / "adapters", base, rank=rank, seed=11)
    shared, merged = work / f"shared-{quant}", work / f"two-model-{quant}"
    if not (shared / "epicode.json").is_file():
        convert_lora(base, ft, inf, shared, mu=0.5, quant=quant)
    if not (merged / "epicode.json").is_file():
        convert_lora(base, ft, inf, merged, mu=0.5, quant=quant, merge=True)
    return shared, merged, json.loads((base / "config.json").read_text())


def measure(bundle: Path, n_ctx: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(bundle), "--n-ctx", str(n_ctx), "--threads", str(threads)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if p.returncode != 0:
        raise SystemExit(f"child failed on {bundle}:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def bundle_files(bundle: Path) -> int:
    m = json.loads((bundle / "epicode.json").read_text())
    per_quant = [e["bytes"] for q in m["files"]["gguf"].values() for e in q.values()]
    return sum(per_quant) + sum(e["bytes"] for e in m["files"].get("lora", {}).values())


def kv_bytes(cfg: dict, n_ctx: int, contexts: int = 2) -> int:
    n_kv_embd = cfg["num_key_value_heads"] * (cfg["hidden_size"] // cfg["num_attention_heads"])
    return contexts * cfg["num_hidden_layers"] * n_ctx * n_kv_embd * 2 * 2


def summarize(runs: list[dict]) -> dict[str, float]:
    keys = ("VmRSS", "RssAnon", "RssFile")
    out = {k: statistics.median(r["after"][k] - r["before"][k] for r in runs) for k in keys}
    out["total"] = statistics.median(r["after"]["VmRSS"] for r in runs)
    out["baseline"] = statistics.median(r["before"]["VmRSS"] for r in runs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quant", default="Q8_0")
    ap.add_argument("--n-ctx", default="512,2048", help="context sizes, comma-separated")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--work", type=Path, default=None, help="folder for the models (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, int(a.n_ctx), a.threads)

    work = a.work or Path(tempfile.mkdtemp(prefix="epicode-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        shape = dict(hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads, intermediate=a.intermediate)
        shared, merged, cfg = make_models(work, a.quant, a.rank, shape)
        bundles = {"two-model": merged, "shared-base": shared}
        print(f"model: llama {_n_params(cfg) / 1e6:.1f}M params (hidden {cfg['hidden_size']}, "
              f"{cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} "
              f"KV heads), LoRA rank {a.rank}; {a.quant}; {a.threads} threads; medians of {a.runs} runs")
        for n_ctx in [int(x) for x in a.n_ctx.split(",")]:
            runs = {"two-model": [], "shared-base": []}
            for _ in range(a.runs):  # interleaved, so drift hits both alike
                for name, bundle in bundles.items():
                    runs[name].append(measure(bundle, n_ctx, a.threads))
            report(cfg, bundles, runs)
    finally:
        if not a.keep and a.work is None:
            shutil.rmtree(work, ignore_errors=True)


def report(cfg: dict, bundles: dict[str, Path], runs: dict[str, list[dict]]) -> None:
    n_ctx = runs["two-model"][0]["n_ctx"]
    base_mb = summarize(runs["two-model"])["baseline"] / MB
    print(f"\nn_ctx {n_ctx}: MB loaded minus baseline (interpreter + libraries: {base_mb:.0f} MB)")
    print(f"{'bundle':<12} {'files':>7} {'KV':>6} {'files+KV':>8} {'RSS':>7} {'private':>7} {'mapped':>7} "
          f"{'RSS/(files+KV)':>14} {'process RSS':>11}")
    s = {}
    for name, bundle in bundles.items():
        s[name] = summarize(runs[name])
        files, kv = bundle_files(bundle), kv_bytes(cfg, n_ctx)
        s[name]["budget"] = files + kv
        s[name]["kv"] = kv
        print(f"{name:<12} {files / MB:7.1f} {kv / MB:6.1f} {(files + kv) / MB:8.1f} {s[name]['VmRSS'] / MB:7.1f} "
              f"{s[name]['RssAnon'] / MB:7.1f} {s[name]['RssFile'] / MB:7.1f} "
              f"{s[name]['VmRSS'] / (files + kv):14.3f} {s[name]['total'] / MB:11.1f}")
    sh, two = s["shared-base"], s["two-model"]
    print(f"item 3: shared-base / two-model RSS = {sh['VmRSS'] / two['VmRSS']:.3f} (goal <= 0.6); "
          f"whole process {sh['total'] / two['total']:.3f}; "
          f"without the KV caches {(sh['VmRSS'] - sh['kv']) / (two['VmRSS'] - two['kv']):.3f}")
    worst = max(v["VmRSS"] / v["budget"] for v in s.values())
    print(f"item 4: loaded RSS / (model files + KV caches) <= {worst:.3f} (goal <= 1.15)")


def _n_params(cfg: dict) -> int:
    h, v, inter, L = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    return L * per_layer + 2 * v * h * (0 if cfg["tie_word_embeddings"] else 1) + v * h * cfg["tie_word_embeddings"] + h


if __name__ == "__main__":
    main()
