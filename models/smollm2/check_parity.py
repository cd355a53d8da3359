"""torch + PEFT (the recipe's view) against llama.cpp with our shared-base bundle (the runtime's view):
the same last-token logits for the shipped adapters on the GGUF base.

    pip install -e '.[train]' && python models/smollm2/check_parity.py [--mu 0.5]

Converts the family at mu with an F32 base (and F32 adapters) and an F32 KV cache, then compares, for a few
dev prompts, the expert (base + (1 + mu) dW_finetuned - mu dW_inferior) and the amateur (base + dW_finetuned)
against the same weights built in torch from the PEFT folders. Prints the max abs difference per prompt.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import llama_cpp  # noqa: E402,F401  (before numpy: see the README's GPU notes)
import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mu", type=float, default=0.5)
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--family", type=Path, default=HERE)
    args = ap.parse_args()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import make_data
    import recipe
    from epicode_edge.converters.lora import convert_lora
    from epicode_edge.runtime import load

    torch.set_num_threads(2)
    gguf = recipe.base_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    rows = make_data.splits()["dev"][: args.n]
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        b = convert_lora(gguf, args.family / "finetuned", args.family / "inferior", Path(tmp) / "b", mu=args.mu, quant=("F32",))
        rt = load(b.path, n_ctx=256, kv_type="f32")
        try:
            for role in ("amateur", "expert"):
                hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
                coef = {"amateur": [("finetuned", 1.0)],
                        "expert": [("finetuned", 1 + args.mu), ("inferior", -args.mu)]}[role]
                deltas = {}
                for which, c in coef:
                    m = PeftModel.from_pretrained(hf, args.family / which)
                    for name, d in recipe.lora_deltas(m, torch).items():
                        deltas[name.replace("base_model.model.", "", 1)] = deltas.get(
                            name.replace("base_model.model.", "", 1), 0) + c * d
                    hf = m.unload()
                with torch.no_grad():
                    for name, mod in hf.named_modules():
                        if name in deltas:
                            mod.weight += deltas[name]
                engine = rt.expert if role == "expert" else rt.amateur
                for r in rows:
                    ids, _ = recipe.chat_ids(tok, r["prompt"], None)
                    with torch.inference_mode():
                        want = hf(torch.tensor([ids])).logits[0, -1].numpy()  # (V,)
                    engine.truncate(0)
                    got = np.asarray(engine.prefill(ids), dtype=np.float32)  # (V,)
                    diff = float(np.abs(got - want).max())
                    worst = max(worst, diff)
                    print(f"{role:8s} {r['id']}: max |llama.cpp - torch| = {diff:.2e}, argmax "
                          f"{'equal' if got.argmax() == want.argmax() else 'DIFFERENT'}", flush=True)
        finally:
            rt.close()
    print(f"worst: {worst:.2e}")


if __name__ == "__main__":
    main()
