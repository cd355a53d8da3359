"""Benchmark `convert` on a generated >= 1 GB bf16 sharded checkpoint pair: time, throughput, memory.

    python bench/convert.py                         # hf + gguf F16, then hf + gguf Q8_0; 1 run each
    python bench/convert.py --to hf --repeat 3      # medians of 3 runs
    python bench/convert.py --layers 22             # a ~2.2 GB checkpoint
    python bench/convert.py --arch gemma2           # only the Gemma-2-shaped pair (default: llama, then gemma2)
    python bench/convert.py --gguf model.gguf --to gguf --quant Q8_0   # a GGUF input (as both checkpoints)
    python bench/convert.py --to hf --mergekit mk/bin/mergekit-yaml --repeat 3   # with the anchor row

The pair (a wide Llama: hidden 2048, 16 heads / 4 KV heads, MLP 5632, vocab 16384, untied; bf16; shards
of ~300 MB with an index; then a Gemma 2 of the same size: 8 heads of 256, four norms per layer, tied
embeddings, a SentencePiece tokenizer) is written chunk by chunk into a temporary folder, deleted at the end. Each
convert runs in a child process that the parent polls through /proc/PID/status every 10 ms:

    peak RSS      VmHWM: everything resident, file pages of the memory-mapped inputs included
    peak private  the largest RssAnon seen: anonymous memory, which the kernel cannot drop

Streaming means private memory stays far below the input size (the target is < 25% of one checkpoint).
Input reads come from the page cache unless --drop-caches (root) empties it first. "wall" is the convert()
call in the child (imports and interpreter start not counted); MB/s is input bytes (finetuned + inferior)
over that time. The anchor, when mergekit is installed (its own venv: it pins torch and transformers), is
mergekit's linear merge of the same pair (weights 1 + mu and -mu), timed as a whole process as ours is in
its row (interpreter start and imports included), with time and private-memory ratios. For a GGUF input the peak is also given above the child's private memory at start
(interpreter + numpy + gguf-py + epicode_edge imports): what the conversion itself adds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CHUNK_ROWS_BYTES = 16 << 20  # the generator writes 16 MB pieces
MU = 0.3


def wide_llama(layers: int) -> dict:
    from factory import make_config

    return make_config("llama", 16384, "bfloat16", hidden=2048, layers=layers, heads=16, kv_heads=4,
                       intermediate=5632)


def wide_gemma2(layers: int) -> dict:
    """Gemma 2 2B's shape at the Llama row's size: 8 heads of 256 (4 KV heads), four norms per layer, tied
    embeddings; the GGUF export adds 1 to every norm and writes the soft-capping and sliding-window keys."""
    return {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": 16384, "hidden_size": 2048,
            "intermediate_size": 5632, "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 4,
            "head_dim": 256, "query_pre_attn_scalar": 256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
            "sliding_window": 4096, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}


SHAPES = {"llama": wide_llama, "gemma2": wide_gemma2}


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, v, inter = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    nq, nkv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (nq, h),
                       p + "self_attn.k_proj.weight": (nkv, h), p + "self_attn.v_proj.weight": (nkv, h),
                       p + "self_attn.o_proj.weight": (h, nq), p + "post_attention_layernorm.weight": (h,),
                       p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter)})
        if cfg["model_type"] == "gemma2":
            shapes.update({p + "pre_feedforward_layernorm.weight": (h,), p + "post_feedforward_layernorm.weight": (h,)})
    shapes["model.norm.weight"] = (h,)
    if not cfg.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (v, h)
    return shapes


def _pieces(shape, seed: int, inferior: bool):
    """bf16 bits of one tensor, 16 MB of rows at a time; the inferior is the finetuned plus small noise."""
    from epicode_edge.converters.safetensors_io import f32_to_bf16

    rng_ft = np.random.default_rng(seed)
    rng_noise = np.random.default_rng(seed + 1)
    rows = shape[0]
    row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    scale = 1.0 if len(shape) == 1 else 1.0 / np.sqrt(shape[-1])
    step = max(1, CHUNK_ROWS_BYTES // (4 * row))
    for r in range(0, rows, step):
        n = min(step, rows - r)
        x = rng_ft.standard_normal((n, *shape[1:]), dtype=np.float32)
        x *= scale
        if len(shape) == 1:
            x += 1.0
        if inferior:
            x -= (0.05 * scale) * rng_noise.standard_normal(x.shape, dtype=np.float32)
        yield f32_to_bf16(x)


def write_checkpoint(out: Path, cfg: dict, tokenizer_dir: Path, inferior: bool, shard_bytes: int = 300 << 20) -> int:
    """An HF folder written piece by piece (the generator holds 16 MB at a time). Returns tensor bytes."""
    from epicode_edge.converters.hf import plan_shards
    from epicode_edge.converters.checkpoint import TensorInfo
    from epicode_edge.converters.safetensors_io import SafetensorsWriter

    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    shapes = tensor_shapes(cfg)
    infos = [TensorInfo(n, "BF16", s) for n, s in shapes.items()]
    shards = plan_shards(infos, shard_bytes)
    weight_map, total = {}, 0
    for k, group in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        with SafetensorsWriter(out / fname, [(t.name, "BF16", t.shape) for t in group], {"format": "pt"}) as w:
            for t in group:
                seed = list(shapes).index(t.name)
                w.write_chunks(t.name, _pieces(t.shape, seed, inferior))
                weight_map[t.name] = fname
                total += 2 * int(np.prod(t.shape, dtype=np.int64))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


# ---------------------------------------------------------------------------------------------- measuring


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def poll(proc) -> tuple[int, int]:
    """Wait for a child, reading /proc every 10 ms: (peak RssAnon, peak VmHWM) seen."""
    peak_anon = peak_hwm = 0
    while proc.poll() is None:
        s = _status(proc.pid)
        peak_anon = max(peak_anon, s.get("RssAnon", 0))
        peak_hwm = max(peak_hwm, s.get("VmHWM", 0))
        time.sleep(0.01)
    return peak_anon, peak_hwm


def run_child(ft: Path, inf: Path, out: Path, to: str, quant: str) -> dict:
    """convert() in a child process polled every 10 ms; returns the child's own timing + memory peaks, and the
    child's whole wall time (interpreter start and imports included: what the mergekit anchor is timed on)."""
    args = json.dumps({"ft": str(ft), "inf": str(inf), "out": str(out), "to": to, "quant": quant})
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", args], stdout=subprocess.PIPE, text=True)
    peak_anon, peak_hwm = poll(proc)
    process_s = time.perf_counter() - t0
    stdout = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {stdout}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(peak_rss=max(peak_hwm, result["vm_hwm"]), peak_anon=max(peak_anon, result["anon_end"]),
                  process_s=process_s)
    return result


def mergekit_config(ft: Path, inf: Path, mu: float) -> str:
    """mergekit's linear merge with weights 1 + mu and -mu, not normalised: ft + mu * (ft - inf), the expert;
    computed in float32 and written as bf16, as our --to hf writes a bf16 pair."""
    return (f"merge_method: linear\nparameters:\n  normalize: false\ndtype: float32\nout_dtype: bfloat16\n"
            f"models:\n  - model: {ft}\n    parameters:\n      weight: {1 + mu}\n"
            f"  - model: {inf}\n    parameters:\n      weight: {-mu}\n")


def run_mergekit(exe: str, ft: Path, inf: Path, out: Path, mu: float) -> dict:
    """The anchor: `mergekit-yaml` on the same pair in a child polled like ours (its whole process is timed)."""
    cfg = out.parent / "mergekit.yml"
    cfg.write_text(mergekit_config(ft, inf, mu))
    t0 = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # local folders: no hub lookups
    proc = subprocess.Popen([exe, str(cfg), str(out), "--copy-tokenizer", "--quiet"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    peak_anon, peak_hwm = poll(proc)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"mergekit failed ({proc.returncode}): {err[-2000:]}")
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"process_s": seconds, "peak_anon": peak_anon, "peak_rss": peak_hwm, "output_bytes": size}


def same_expert(ours: Path, theirs: Path) -> tuple[float, float]:
    """Our expert against mergekit's, both bf16: (the largest difference relative to its tensor's largest
    value, the share of values that differ). We compute ft + mu (ft - inf), mergekit (1 + mu) ft - mu inf, both in
    float32, which can round to neighbouring bf16 values (a relative step of 2^-8 at the top of a tensor)."""
    from epicode_edge.converters.checkpoint import open_checkpoint

    worst, differ, total = 0.0, 0, 0
    with open_checkpoint(ours) as a, open_checkpoint(theirs) as b:
        for name in a.tensors:
            x, y = a.read_f32(name), b.read_f32(name)
            d = np.abs(x - y)
            worst = max(worst, float(d.max() / max(np.abs(x).max(), 1e-30)))
            differ, total = differ + int((d > 0).sum()), total + d.size
    return worst, differ / total


def bench_mergekit(a, exe: str, tmp: Path, one: int) -> None:
    """Ours (--to hf, bf16 out) against mergekit's linear merge on the same pair, runs interleaved."""
    ours, theirs = [], []
    for _ in range(a.repeat):
        for path in (tmp / "bundle", tmp / "mergekit"):
            shutil.rmtree(path, ignore_errors=True)
        ours.append(run_child(tmp / "finetuned", tmp / "inferior", tmp / "bundle", "hf", "F16"))
        theirs.append(run_mergekit(exe, tmp / "finetuned", tmp / "inferior", tmp / "mergekit", MU))
    from epicode_edge.converters.bundle import open_bundle

    rel, share = same_expert(open_bundle(tmp / "bundle").hf("expert"), tmp / "mergekit")
    m = {k: statistics.median(r[k] for r in theirs) for k in ("process_s", "peak_anon")}
    o = {k: statistics.median(r[k] for r in ours) for k in ("process_s", "peak_anon")}
    print(f"anchor: mergekit linear merge (weights {1 + MU:g}, {-MU:g}; float32 math, bf16 out; median of "
          f"{len(theirs)}): whole process {m['process_s']:.1f} s, wrote {theirs[0]['output_bytes'] / 1e9:.2f} GB "
          f"(the expert), peak private {m['peak_anon'] / 1e6:.0f} MB = {100 * m['peak_anon'] / one:.1f}% of one "
          f"checkpoint")
    print(f"ours --to hf, whole process: {o['process_s']:.1f} s (time ratio ours/mergekit "
          f"{statistics.median(r['process_s'] / t['process_s'] for r, t in zip(ours, theirs)):.2f}), wrote "
          f"{ours[0]['output_bytes'] / 1e9:.2f} GB (the bundle), peak private {o['peak_anon'] / 1e6:.0f} MB "
          f"(ratio {statistics.median(r['peak_anon'] / t['peak_anon'] for r, t in zip(ours, theirs)):.2f}); "
          f"our expert vs mergekit's: {100 * share:.2g}% of the values differ, by at most {100 * rel:.2g}% of their "
          f"tensor's largest value")


def _import_for(to: str) -> list[str]:
    """Import what convert() would import on first use for these formats (gguf-py with its vocab module,
    llama.cpp's library, mlx), so that "wall" is the conversion, as the module doc says; their time is
    printed apart."""
    import importlib

    names = ["gguf", "epicode_edge.converters.gguf"]
    if "hf" in to or "mlx" in to:
        names += ["epicode_edge.converters.gguf_to_hf", "epicode_edge.converters.tokenizer_from_gguf"]
    if "mlx" in to and importlib.util.find_spec("mlx_lm") is not None:
        names += ["mlx_lm"]
    for name in names:
        importlib.import_module(name)
    from epicode_edge.converters import gguf_file

    gguf_file.native_to_float(8)  # Q8_0: loads llama.cpp's base library
    return names


def child(spec: str) -> None:
    from epicode_edge.converters.convert import convert

    a = json.loads(spec)
    if a.get("anchor"):
        return anchor_child(a)
    t0 = time.perf_counter()
    imports = _import_for(a["to"])
    imports_s = time.perf_counter() - t0
    before = _status(os.getpid())
    t0 = time.perf_counter()
    b = convert(a["ft"], a["inf"], a["out"], mu=MU, to=a["to"], quant=a["quant"])
    seconds = time.perf_counter() - t0
    s = _status(os.getpid())
    print(json.dumps({"seconds": seconds, "imports_s": imports_s, "imports": imports, "vm_hwm": s["VmHWM"],
                      "anon_end": s["RssAnon"],
                      "anon_start": before["RssAnon"], "output_bytes": b.summary["output_bytes"]}))


def anchor_child(a: dict) -> None:
    """llama.cpp's own requantize of the input to the quant (llama_model_quantize, allow_requantize, all cores):
    one input read, dequantized and encoded once, by llama.cpp's reference encoders, as llama-quantize does."""
    import llama_cpp  # noqa: F401 - imported before the timing, as in our child

    from epicode_edge.converters.gguf import QUANTS, llama_quantize

    before = _status(os.getpid())
    t0 = time.perf_counter()
    llama_quantize(Path(a["ft"]), Path(a["out"]), QUANTS[a["quant"]][0], allow_requantize=True)
    seconds = time.perf_counter() - t0
    s = _status(os.getpid())
    print(json.dumps({"seconds": seconds, "vm_hwm": s["VmHWM"], "anon_end": s["RssAnon"],
                      "anon_start": before["RssAnon"], "output_bytes": Path(a["out"]).stat().st_size}))


def run_anchor(gguf_in: Path, out: Path, quant: str) -> dict:
    spec = json.dumps({"anchor": True, "ft": str(gguf_in), "out": str(out), "quant": quant})
    proc = subprocess.Popen([sys.executable, __file__, "--child", spec], stdout=subprocess.PIPE, text=True)
    peak_anon, _ = poll(proc)
    stdout = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"anchor child failed ({proc.returncode}): {stdout}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_anon"] = max(peak_anon, result["anon_end"])
    out.unlink(missing_ok=True)
    return result


def bench_gguf(a, configs) -> None:
    """GGUF input: the same file as both checkpoints (mu is applied all the same), each config a child."""
    one = a.gguf.stat().st_size
    with tempfile.TemporaryDirectory(prefix="epicode-bench-", dir=a.tmp) as tmp:
        out = Path(tmp) / "bundle"
        for to, quant in configs:
            runs, anchors = [], []
            anchor = to == "gguf" and "," not in quant and quant not in ("F32", "F16", "BF16")
            for _ in range(a.repeat):  # interleaved with the anchor
                shutil.rmtree(out, ignore_errors=True)
                runs.append(run_child(a.gguf, a.gguf, out, to, quant))
                if anchor:
                    anchors.append(run_anchor(a.gguf, Path(tmp) / "anchor.gguf", quant))
            med = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "peak_rss", "peak_anon", "imports_s")}
            base = statistics.median(r["anon_start"] for r in runs)
            secs = ", ".join(f"{r['seconds']:.2f}" for r in runs)
            print(f"  runs: {secs} s; first-use imports before each "
                  f"(not counted: {', '.join(runs[0]['imports'])}): {med['imports_s']:.2f} s")
            print(f"GGUF input {a.gguf.name} ({one / 1e6:.0f} MB) -> --to {to} --quant {quant} (median of "
                  f"{len(runs)}): wall {med['seconds']:.1f} s, read {2 * one / 1e6:.0f} MB at "
                  f"{2 * one / med['seconds'] / 1e6:.0f} MB/s, wrote {runs[0]['output_bytes'] / 1e6:.0f} MB; peak "
                  f"private (RssAnon) {med['peak_anon'] / 1e6:.0f} MB = {100 * med['peak_anon'] / one:.0f}% of one "
                  f"input, {(med['peak_anon'] - base) / 1e6:.0f} MB = {100 * (med['peak_anon'] - base) / one:.0f}% "
                  f"above the interpreter + imports at start ({base / 1e6:.0f} MB)")
            if anchors:
                t = statistics.median(r["seconds"] for r in anchors)
                ratio = statistics.median(r["seconds"] / (2 * q["seconds"]) for r, q in zip(runs, anchors))
                from epicode_edge.converters.checkpoint import open_checkpoint

                sizes = [(t.dtype, math.prod(t.shape)) for t in open_checkpoint(a.gguf).tensors.values()]
                same = sum(n for dtype, n in sizes if dtype == quant) / max(sum(n for _, n in sizes), 1)
                if same:
                    print(f"  ({100 * same:.0f}% of the input's values are stored as {quant} already: llama.cpp "
                          f"copies those tensors, as we do for the amateur; our expert is still dequantized, "
                          f"extrapolated and encoded)")
                print(f"anchor: llama.cpp's own requantize of the input to {quant} (llama_model_quantize, "
                      f"{os.cpu_count()} threads; one input, one output; median of {len(anchors)}): {t:.2f} s, "
                      f"{one / t / 1e6:.0f} MB/s of input, peak private "
                      f"{statistics.median(r['peak_anon'] for r in anchors) / 1e6:.0f} MB; ours makes two outputs "
                      f"from two inputs: time / (2 x anchor) = {ratio:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=11, help="decoder layers (11: ~1.13 GB per checkpoint)")
    ap.add_argument("--arch", action="append", choices=sorted(SHAPES),
                    help="shape of the generated pair (repeatable; default: llama, then gemma2)")
    ap.add_argument("--to", action="append", help="output formats of one configuration (repeatable)")
    ap.add_argument("--quant", action="append", help="GGUF quants, one per --to")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--drop-caches", action="store_true", help="drop the page cache before each run (root)")
    ap.add_argument("--tmp", default=None, help="where to write the checkpoints (default: system temp)")
    ap.add_argument("--gguf", type=Path, default=None,
                    help="convert this GGUF file (as finetuned and inferior) instead of a generated pair")
    ap.add_argument("--mergekit", default=shutil.which("mergekit-yaml"),
                    help="mergekit-yaml to run as the anchor (default: on PATH; not a dependency: "
                         "python -m venv mk && mk/bin/pip install mergekit)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child)
    configs = list(zip(a.to or ["hf,gguf", "hf,gguf"], a.quant or ["F16", "Q8_0"]))
    if a.gguf is not None:
        return bench_gguf(a, configs)
    for arch in a.arch or ["llama", "gemma2"]:
        bench_hf(a, arch, configs)


def bench_hf(a, arch: str, configs) -> None:
    """A generated pair of this shape, each config a child; the mergekit anchor for the Llama shape."""
    from factory import make_spm_tokenizer, make_tokenizer

    with tempfile.TemporaryDirectory(prefix="epicode-bench-", dir=a.tmp) as tmp:
        tmp = Path(tmp)
        cfg = SHAPES[arch](a.layers)
        t0 = time.perf_counter()
        tok = make_spm_tokenizer(tmp / "tok") if arch == "gemma2" else make_tokenizer(tmp / "tok")
        one = write_checkpoint(tmp / "finetuned", cfg, tok, inferior=False)
        write_checkpoint(tmp / "inferior", cfg, tok, inferior=True)
        n_files = len(list((tmp / "finetuned").glob("*.safetensors")))
        print(f"[{arch}] generated 2 x {one / 1e9:.2f} GB bf16 ({n_files} shards each, largest tensor "
              f"{max(np.prod(s) for s in tensor_shapes(cfg).values()) * 2 / 1e6:.0f} MB) in "
              f"{time.perf_counter() - t0:.1f} s")
        read = 2 * one
        for to, quant in configs:
            runs = []
            for _ in range(a.repeat):
                shutil.rmtree(tmp / "bundle", ignore_errors=True)
                if a.drop_caches:
                    subprocess.run(["sync"])
                    Path("/proc/sys/vm/drop_caches").write_text("1\n")
                runs.append(run_child(tmp / "finetuned", tmp / "inferior", tmp / "bundle", to, quant))
            med = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "peak_rss", "peak_anon")}
            print(f"[{arch}] convert --to {to} --quant {quant} (median of {len(runs)}): wall {med['seconds']:.1f} s, "
                  f"read {read / 1e9:.2f} GB at {read / med['seconds'] / 1e9:.2f} GB/s, "
                  f"wrote {runs[0]['output_bytes'] / 1e9:.2f} GB; peak RSS {med['peak_rss'] / 1e6:.0f} MB, "
                  f"peak private (RssAnon) {med['peak_anon'] / 1e6:.0f} MB = "
                  f"{100 * med['peak_anon'] / one:.1f}% of one checkpoint, {100 * med['peak_anon'] / read:.1f}% "
                  f"of the input read (interpreter + imports at start: {runs[0]['anon_start'] / 1e6:.0f} MB)")
        if arch == "llama":  # the anchor row is for the Llama shape
            if a.mergekit:
                bench_mergekit(a, a.mergekit, tmp, one)
            else:
                print("anchor: mergekit not found (--mergekit PATH, or mergekit-yaml on PATH): no ratio row")
        shutil.rmtree(tmp / "bundle", ignore_errors=True)


if __name__ == "__main__":
    main()
