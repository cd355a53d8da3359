"""What `batch --ray` costs over the local batch: the same requests three ways, same bundle, same settings.

    python bench/ray_batch.py                       # 48 requests x 48 tokens, tiny F32 test model, 2 actors
    python bench/ray_batch.py --requests 200 --max-tokens 64 --actors 2 --parallel 4 --runs 3

    local        apps/batch.run_batch in this process, --parallel requests decoded together
    ray-data     apps/ray_batch.run_ray_job: the Ray Data pipeline (what `batch --ray` runs)
    ray-actors   the same Decoder actors driven by ray.util.ActorPool, no Ray Data: the cost of Ray Data itself
Figures: ray.init time (once a run, shared by both Ray ways), time to the first block of records, the run's
wall time after ray.init, and the records: every way's must equal the local ones (timings aside).
The model is the tests' tiny Llama (384-token vocabulary) converted to an F32 bundle in a temporary folder
(or --work DIR, reused): the decoding itself is short, so the fixed costs show.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import llama_cpp  # noqa: F401  (before numpy: a CUDA build segfaulted at model load otherwise)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])  # Ray's workers

PROMPTS = ["Hello there", "What is 17 + 25?", "Café crème", "def add(a, b):", "Law, math and logic", "東京"]


def make_bundle(work: Path) -> Path:
    from factory import make_pair

    from epicode_edge.converters.convert import convert

    out = work / "bundle-tiny-F32"
    if not (out / "epicode.json").exists():
        ft, inf = make_pair(work / "pair-tiny", arch="llama", seed=5)
        convert(ft, inf, out, mu=0.5, to=("gguf",), quant=("F32",))
    return out


def strip(path: Path) -> dict:
    return {(r["id"], r["line"]): {k: v for k, v in r.items() if k != "timings"}
            for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="folder for the model (kept; reused)")
    args = ap.parse_args()
    import ray
    from ray.util import ActorPool

    from epicode_edge.apps import batch, ray_batch
    from epicode_edge.runtime import EngineOptions, load
    from epicode_edge.version import __version__

    tmp = tempfile.TemporaryDirectory(prefix="epicode-bench-ray-") if args.work is None else None
    work = Path(tmp.name) if tmp else args.work
    work.mkdir(parents=True, exist_ok=True)
    bundle = make_bundle(work)
    inp = work / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": f"{PROMPTS[i % len(PROMPTS)]} #{i}"}, ensure_ascii=False)
                           + "\n" for i in range(args.requests)), encoding="utf-8")
    engine = EngineOptions(backend="llama.cpp", quant="F32", n_ctx=256)
    defaults = {"max_tokens": args.max_tokens}
    block = max(4, 4 * args.parallel)
    print(f"{args.requests} requests x {args.max_tokens} tokens, {args.actors} actors x 1 thread, --parallel "
          f"{args.parallel} (blocks of {block}), {args.runs} runs; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores; ray {ray.__version__}")

    def out(name):
        p = work / f"{name}.jsonl"
        p.unlink(missing_ok=True)
        return p

    rows = {"local": [], "ray-data": [], "ray-actors": []}
    for run in range(args.runs):
        t0 = time.perf_counter()
        with load(bundle, replace(engine, n_threads=1)) as rt:
            batch.run_batch(rt, inp, out("local"), parallel=args.parallel, **defaults)
        rows["local"].append({"init": 0.0, "first": float("nan"), "wall": time.perf_counter() - t0})
        want = strip(work / "local.jsonl")

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=args.actors, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
        init = time.perf_counter() - t0
        try:
            first = []

            def progress(done, total, rec):
                if rec is not None and not first:
                    first.append(time.perf_counter())

            t1 = time.perf_counter()
            with batch.prepare(inp, out("ray-data")) as job:
                ray_batch.run_ray_job(bundle, job, actors=args.actors, parallel=args.parallel,
                                      engine=engine, progress=progress, **defaults)
            rows["ray-data"].append({"init": init, "first": first[0] - t1, "wall": time.perf_counter() - t1})

            t1 = time.perf_counter()
            spec = {"bundle": str(bundle), "manifest_sha256": ray_batch.manifest_digest(bundle),
                    "version": __version__, "verify": True, "load": replace(engine, n_threads=1).changed(),
                    "defaults": defaults, "compare": False, "parallel": args.parallel}
            actor = ray.remote(num_cpus=1, max_restarts=0)(ray_batch.Decoder)
            pool = ActorPool([actor.remote(spec) for _ in range(args.actors)])
            t_first = None
            with batch.prepare(inp, out("ray-actors")) as job:
                rows_ = [json.dumps(asdict(r), ensure_ascii=False) for r in job.pending]
                blocks = [{"request": rows_[i:i + block]} for i in range(0, len(rows_), block)]
                for res in pool.map_unordered(lambda a, b: a.__call__.remote(b), blocks):
                    t_first = t_first or time.perf_counter()
                    if any(res["fatal"]):
                        raise SystemExit(f"ray-actors: {res['fatal']}")
                    for line in res["record"]:
                        job.out.append(line.encode("utf-8"))
            rows["ray-actors"].append({"init": init, "first": t_first - t1, "wall": time.perf_counter() - t1})
        finally:
            ray.shutdown()
        for name in ("ray-data", "ray-actors"):
            if strip(work / f"{name}.jsonl") != want:
                raise SystemExit(f"{name}: records differ from the local batch's")
        print(f"  run {run + 1}/{args.runs}: " + ", ".join(f"{n} {r[-1]['wall']:.1f} s" for n, r in rows.items())
              + f" (ray.init {init:.1f} s); records equal")
    print(f"\n{'':12}{'ray.init s':>11}{'first block s':>14}{'wall s':>8}   (medians; wall: after ray.init)")
    for name, rs in rows.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("init", "first", "wall")}
        print(f"{name:12}{med['init']:>11.1f}{med['first']:>14.1f}{med['wall']:>8.1f}")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
