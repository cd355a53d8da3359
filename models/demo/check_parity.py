"""Check that the saved demo checkpoints are HF-Llama compatible: the recipe's torch model, mlx_lm and our
GGUF export in llama.cpp give the same logits on a chat prompt.

    python models/demo/check_parity.py [FAMILY_DIR]     # needs torch (the `train` extra)

Prints the max abs logit difference per pair; exits 1 if torch vs mlx_lm exceeds 1e-4 or F32 GGUF vs
mlx_lm exceeds 5e-3 (llama.cpp keeps its KV cache in f16).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PROMPT = [{"role": "user", "content": "Compute (7 + 5) * 3 - 4."}]


def torch_logits(folder: Path, ids: list[int]) -> np.ndarray:
    import torch
    from safetensors.torch import load_file

    from model import Llama

    cfg = json.loads((folder / "config.json").read_text())
    m = Llama(cfg)
    m.load_state_dict({k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()})
    m.eval()
    with torch.no_grad():
        return m(torch.tensor([ids]))[0, -1].numpy()  # (V,)


def mlx_logits(folder: Path) -> tuple[np.ndarray, list[int]]:
    import mlx.core as mx
    import mlx_lm

    model, tok = mlx_lm.load(str(folder))
    text = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    return np.array(model(mx.array([ids]))[0, -1].astype(mx.float32)), ids  # (V,)


def gguf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    sys.path.insert(0, str(HERE.parents[1]))
    from epicode_edge.converters.gguf import hf_to_gguf
    from epicode_edge.runtime import open_backend

    with tempfile.TemporaryDirectory() as tmp:
        path = hf_to_gguf(folder, Path(tmp) / "m.gguf", quant="F32")
        b = open_backend(path, "llama.cpp", n_ctx=256)
        try:
            assert b.tokenize(mlx_prompt_text(folder), special=True, add_bos=False) == ids, "tokenization differs"
            return np.array(b.prefill(ids), dtype=np.float32)  # (V,)
        finally:
            b.close()


def mlx_prompt_text(folder: Path) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(PROMPT, add_generation_prompt=True,
                                                                          tokenize=False)


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    ok = True
    for role in ("inferior", "finetuned"):
        folder = root / role
        lm, ids = mlx_logits(folder)
        lt = torch_logits(folder, ids)
        lg = gguf_logits(folder, ids)
        d_t, d_g = float(np.abs(lt - lm).max()), float(np.abs(lg - lm).max())
        print(f"{role}: {len(ids)} prompt tokens; max |torch - mlx_lm| = {d_t:.2e}; "
              f"max |llama.cpp F32 GGUF - mlx_lm| = {d_g:.2e}; argmax {lt.argmax()} {lm.argmax()} {lg.argmax()}")
        ok &= d_t <= 1e-4 and d_g <= 5e-3  # llama.cpp's KV cache is f16
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
