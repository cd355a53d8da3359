"""Tiny GGUF files of architectures other than Llama/Qwen (gemma2, gemma3, phi3), written with gguf-py's
GGUFWriter in the tensor layout and metadata that llama.cpp's own converter writes for them
(convert_hf_to_gguf.py, in the llama-cpp-python sdist: conversion/gemma.py Gemma2Model / Gemma3Model,
conversion/phi.py Phi3MiniModel), and that llama.cpp's loader asks for (src/models/gemma2.cpp, gemma3.cpp,
phi3.cpp). Tensor names come from gguf-py's tables, never typed here. Checked once against that converter
run on tiny transformers checkpoints of the same sizes (Gemma2Config, Gemma3TextConfig, Phi3Config): the same
`{arch}.*` keys and values, tensor names and shapes.

    ft, inf = make_arch_gguf_pair(tmp / "g2", "gemma2")     # finetuned and an "earlier checkpoint"
    write_arch_gguf(path, "phi3", seed=0, meta={"phi3.block_count": 3})   # metadata overridden (hostile tests)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import gguf
from gguf import MODEL_TENSOR as T

LAYERS, EMBD, HEADS, KV_HEADS, FF = 2, 64, 4, 2, 128
HEAD_DIM = EMBD // HEADS
ARCHS = ("gemma2", "gemma3", "phi3")


def _name(tensor: T, bid: int | None = None) -> str:
    return gguf.TENSOR_NAMES[tensor].format(bid=bid) + ".weight"


def layout(arch: str, vocab: int, layers: int = LAYERS) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy shape (rows first), as llama.cpp's converter writes the model."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    out = {_name(T.TOKEN_EMBD): (vocab, EMBD), _name(T.OUTPUT_NORM): (EMBD,)}
    if arch == "phi3":
        out[_name(T.OUTPUT)] = (vocab, EMBD)  # Phi-3 does not tie embeddings
    for i in range(layers):
        out[_name(T.ATTN_NORM, i)] = (EMBD,)
        if arch == "phi3":  # fused qkv and gate_up, as in the HF checkpoint
            out[_name(T.ATTN_QKV, i)] = (q + 2 * kv, EMBD)
            out[_name(T.ATTN_OUT, i)] = (EMBD, q)
            out[_name(T.FFN_NORM, i)] = (EMBD,)
            out[_name(T.FFN_UP, i)] = (2 * FF, EMBD)
            out[_name(T.FFN_DOWN, i)] = (EMBD, FF)
            continue
        out[_name(T.ATTN_Q, i)] = (q, EMBD)
        out[_name(T.ATTN_K, i)] = (kv, EMBD)
        out[_name(T.ATTN_V, i)] = (kv, EMBD)
        out[_name(T.ATTN_OUT, i)] = (EMBD, q)
        if arch == "llama":  # (the hostile tests use it: an architecture the tool took before any other)
            out.update({_name(T.FFN_NORM, i): (EMBD,), _name(T.FFN_GATE, i): (FF, EMBD),
                        _name(T.FFN_UP, i): (FF, EMBD), _name(T.FFN_DOWN, i): (EMBD, FF)})
            continue
        if arch == "gemma3":
            out[_name(T.ATTN_Q_NORM, i)] = (HEAD_DIM,)
            out[_name(T.ATTN_K_NORM, i)] = (HEAD_DIM,)
        out[_name(T.ATTN_POST_NORM, i)] = (EMBD,)
        out[_name(T.FFN_NORM, i)] = (EMBD,)
        out[_name(T.FFN_GATE, i)] = (FF, EMBD)
        out[_name(T.FFN_UP, i)] = (FF, EMBD)
        out[_name(T.FFN_DOWN, i)] = (EMBD, FF)
        out[_name(T.FFN_POST_NORM, i)] = (EMBD,)
    return out


def hparams(arch: str, layers: int = LAYERS) -> dict[str, object]:
    """The `{arch}.*` keys each converter class writes (set_gguf_parameters), with tiny values."""
    k = {
        "context_length": 512, "embedding_length": EMBD, "block_count": layers, "feed_forward_length": FF,
        "attention.head_count": HEADS, "attention.head_count_kv": KV_HEADS,
        "attention.layer_norm_rms_epsilon": 1e-6,
    }
    if arch == "gemma2":
        k.update({"attention.key_length": HEAD_DIM, "attention.value_length": HEAD_DIM,
                  "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "attention.sliding_window": 8})
    elif arch == "gemma3":
        k.update({"attention.key_length": HEAD_DIM, "attention.value_length": HEAD_DIM, "rope.freq_base": 1e6,
                  "rope.freq_base_swa": 10000.0, "attention.sliding_window": 8})
    elif arch == "llama":
        k.update({"rope.dimension_count": HEAD_DIM, "rope.freq_base": 10000.0})
    elif arch == "phi3":
        k.update({"rope.scaling.original_context_length": 512, "rope.dimension_count": HEAD_DIM,
                  "rope.freq_base": 10000.0, "attention.sliding_window": 0})
    return {f"{arch}.{key}": v for key, v in k.items()}


_TYPES = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
          "Q8_0": gguf.GGMLQuantizationType.Q8_0}


def spm_tokenizer(root: Path) -> Path:
    from factory import make_spm_tokenizer

    tok = Path(root) / "tok-spm"
    if not (tok / "tokenizer.model").is_file():
        make_spm_tokenizer(tok, files=("model",))
    return tok


def write_arch_gguf(path: Path, arch: str, seed: int, *, quant: str = "F32", like: Path | None = None,
                    delta: float = 0.05, meta: dict | None = None, layers: int = LAYERS,
                    tok_dir: Path | None = None, arch_name: str | None = None, f32: tuple[str, ...] = ()) -> Path:
    """One model file. like: a file written before, drifted by `delta` (an earlier save of the same run);
    meta: metadata keys set after the architecture's own (a value of None drops the key); arch_name: the
    general.architecture written (the layout stays `arch`'s); f32: tensors stored F32 whatever the quant."""
    from epicode_edge.converters.tokenizer_meta import read_tokenizer

    path = Path(path)
    tok_dir = tok_dir or spm_tokenizer(path.parent)
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model")).vocab_size()
    rng = np.random.default_rng(seed)
    base = None
    if like is not None:
        from epicode_edge.converters.checkpoint import open_checkpoint

        with open_checkpoint(like) as c:
            base = {n: c.read_f32(n).copy() for n in c.tensors}
    w = gguf.GGUFWriter(str(path), arch_name or arch)
    keys = {f"{arch_name or arch}.{k.split('.', 1)[1]}": v for k, v in hparams(arch, layers).items()}
    keys.update(meta or {})
    w.add_name("tiny")  # (llama.cpp looks for Phi-3's special tokens in a model named "phi3")
    read_tokenizer(tok_dir, vocab, "llama").add_to(w)
    if arch.startswith("gemma"):
        w.add_add_space_prefix(False)
    for key, v in keys.items():
        w.kv_data[0].pop(key, None)  # (a tokenizer key replaced)
        if v is None:
            continue
        if isinstance(v, bool):
            w.add_bool(key, v)
        elif isinstance(v, int):
            w.add_uint32(key, v) if 0 <= v < 2**32 else w.add_uint64(key, v)
        elif isinstance(v, float):
            w.add_float32(key, v)
        elif isinstance(v, str):
            w.add_string(key, v)
        else:
            w.add_array(key, v)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32 if quant == "F32" else gguf.LlamaFileType.MOSTLY_F16
                        if quant == "F16" else gguf.LlamaFileType.MOSTLY_Q8_0))
    for name, shape in layout(arch, vocab, layers).items():
        if base is not None:
            x = base[name] + delta * rng.standard_normal(shape).astype(np.float32) * np.abs(base[name]).mean()
        elif len(shape) == 1:
            x = 1.0 + 0.1 * rng.standard_normal(shape)  # norms near one (Gemma's are stored with the +1)
        else:
            x = rng.standard_normal(shape) / np.sqrt(shape[-1])
        x = np.asarray(x, dtype=np.float32)
        qtype = gguf.GGMLQuantizationType.F32 if len(shape) == 1 or name in f32 else _TYPES[quant]
        data = gguf.quants.quantize(x, qtype) if qtype != gguf.GGMLQuantizationType.F32 else x
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_arch_gguf_pair(root: Path, arch: str, quant: str = "F32", seed: int = 0, **kw) -> tuple[Path, Path]:
    """(finetuned, inferior) GGUF files of one tiny model: root/finetuned.gguf and root/inferior.gguf."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tok = spm_tokenizer(root.parent)
    inf = write_arch_gguf(root / "inferior.gguf", arch, seed, quant=quant, tok_dir=tok, **kw)
    ft = write_arch_gguf(root / "finetuned.gguf", arch, seed + 1, quant=quant, like=inf, tok_dir=tok, **kw)
    return ft, inf
