"""GGUF -> HF checkpoint folder, streamed: the reverse of gguf.py's GGUFSink, for the architectures it writes.

    plan = hf_plan(ckpt)                          # a GGUFCheckpoint; UnsupportedError if it cannot be exported
    with GGUFToHFSink(out_dir, ckpt) as sink:
        for name in ckpt.tensors:                 # GGUF names, in the checkpoint's order, one at a time
            sink.write(name, array)               # storage arrays: F32/F16/BF16 as stored, quants dequantized (F32)

    with GGUFAsHF(ckpt) as hf:                    # the same export as a lazy HF checkpoint, nothing written but
        hf.read("model.layers.0.self_attn.q_proj.weight")   # the tokenizer files (e.g. to merge LoRA adapters)

config.json is rebuilt from the `{arch}.*` metadata, the tokenizer from `tokenizer.*` (tokenizer_from_gguf.py).
Tensor names come from gguf-py's own table (each HF name of the family mapped forward, then inverted), and
the q/k rows that llama.cpp's converter (and GGUFSink) permute for Llama are put back in HF's order.
Everything that would not round-trip (an unknown tensor, Llama 3.1 rope factors, partial rotary) is refused
before anything is written.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ..errors import UnsupportedError
from ..hashing import sha256_file
from .checkpoint import TOKENIZER_FILES, Checkpoint, GGUFCheckpoint, TensorInfo
from .gguf import ARCHS
from .hf import MAX_SHARD_BYTES, HFSink
from .safetensors_io import FLOAT_TAGS, ClosingSink
from .tokenizer_from_gguf import hf_tokenizer_files, special_ids

# GGUF architecture -> (HF model_type, HF class)
HF_CLASSES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
              "qwen3": ("qwen3", "Qwen3ForCausalLM")}
# The HF tensor names of these families (transformers' *ForCausalLM); gguf-py's table names each in GGUF.
HF_TENSORS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
HF_LAYER_TENSORS = (
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",  # Qwen2; Llama with attention_bias
    "self_attn.q_norm.weight", "self_attn.k_norm.weight",  # Qwen3
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)
_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass
class HFPlan:
    """What the HF folder of a GGUF checkpoint holds, decided before anything is written."""

    config: dict
    names: dict[str, str]  # GGUF tensor name -> HF name
    tensors: list[TensorInfo]  # HF names, output storage dtypes, in the GGUF's order
    files: dict[str, str]  # tokenizer and generation config files: name -> text
    n_head: int
    n_head_kv: int
    permute_qk: bool  # Llama: q/k rows are in llama.cpp's interleaved order


def storage_tag(info: TensorInfo) -> str:
    """The dtype a GGUF tensor is written in: F32/F16/BF16 as stored, quantized types dequantized to F32
    (as converters.extrapolate.iter_expert yields them)."""
    return info.dtype if info.dtype in FLOAT_TAGS else "F32"


def hf_names(arch: str, n_layer: int) -> dict[str, str]:
    """GGUF tensor name -> HF name for a GGUF architecture name ("llama", "qwen2", "qwen3")."""
    model_arch = next(a for a in ARCHS.values() if gguf.MODEL_ARCH_NAMES[a] == arch)
    table = gguf.get_tensor_name_map(model_arch, n_layer)
    hf = list(HF_TENSORS) + [f"model.layers.{i}.{t}" for i in range(n_layer) for t in HF_LAYER_TENSORS]
    out = {}
    for name in hf:
        gname = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is not None:
            out[gname] = name
    return out


def hf_plan(ckpt: GGUFCheckpoint) -> HFPlan:
    """The HF export of a GGUF checkpoint; UnsupportedError (naming the file and the field or tensor) when
    it cannot be exported faithfully."""
    where, meta = ckpt.path, {**ckpt.config, **ckpt.tokenizer_fields}
    arch = ckpt.arch
    if arch not in HF_CLASSES:
        raise UnsupportedError(f"{where}: architecture {arch!r} cannot be exported to HF/MLX; supported: "
                               f"{', '.join(HF_CLASSES)}")

    def need(key: str, kind=int):
        value = meta.get(f"{arch}.{key}")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise UnsupportedError(f"{where}: no {arch}.{key} in the GGUF metadata")
        return kind(value)

    n_embd, n_layer, n_head = need("embedding_length"), need("block_count"), need("attention.head_count")
    n_head_kv = int(meta.get(f"{arch}.attention.head_count_kv") or n_head)
    head_dim = int(meta.get(f"{arch}.attention.key_length") or n_embd // n_head)
    rope_dims = meta.get(f"{arch}.rope.dimension_count")
    if rope_dims is not None and rope_dims != head_dim:
        raise UnsupportedError(f"{where}: {arch}.rope.dimension_count {rope_dims} differs from the head size "
                               f"{head_dim} (partial rotary is not supported for HF/MLX outputs)")
    names = hf_names(arch, n_layer)
    rope_freqs = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    for name in ckpt.tensors:
        if name == rope_freqs:
            raise UnsupportedError(f"{where}: tensor {name!r} (Llama 3.1 rope scaling factors) cannot be "
                                   "turned back into config.json rope_scaling; use --to gguf")
        if name not in names:
            raise UnsupportedError(f"{where}: tensor {name!r} has no HF name for architecture {arch!r}")
        heads = {"attn_q": n_head, "attn_k": n_head_kv}.get(name.split(".")[2] if name.startswith("blk.") else "")
        if heads and ckpt.tensors[name].shape[0] != heads * head_dim:
            raise UnsupportedError(f"{where}: tensor {name!r} has {ckpt.tensors[name].shape[0]} rows, not "
                                   f"{heads} heads x {head_dim} (from the {arch}.attention.* metadata)")
    embd = ckpt.tensors.get("token_embd.weight")
    if embd is None:
        raise UnsupportedError(f"{where}: no token_embd.weight tensor")
    ids = special_ids(meta)
    tensors = [TensorInfo(names[n], storage_tag(t), t.shape) for n, t in ckpt.tensors.items()]
    matrices = Counter(t.dtype for t in tensors if len(t.shape) == 2)
    model_type, hf_class = HF_CLASSES[arch]
    config = {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": int(embd.shape[0]),
        "hidden_size": n_embd,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": head_dim,
        "max_position_embeddings": need("context_length"),
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon", float)),
        "rope_theta": _f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in ckpt.tensors,
        "torch_dtype": _DTYPE_NAMES[matrices.most_common(1)[0][0] if matrices else "F32"],
        **{f"{role}_token_id": ids[role] for role in ("bos", "eos") if role in ids},
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in ckpt.tensors
        config["mlp_bias"] = False
    scaling = _rope_scaling(meta, arch, where)
    if scaling:
        config["rope_scaling"] = scaling
    files = hf_tokenizer_files(meta, where, model_max_length=config["max_position_embeddings"])
    files["generation_config.json"] = _generation_config(ids)
    return HFPlan(config, names, tensors, files, n_head, n_head_kv, permute_qk=arch == "llama")


def _f32(x) -> float:
    """A GGUF float32 value as the shortest decimal that is the same float32 (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(x)))


def _rope_scaling(meta: dict, arch: str, where) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind == "yarn":
        return {"rope_type": "yarn", "factor": _f32(factor),
                "original_max_position_embeddings": int(meta[f"{arch}.rope.scaling.original_context_length"])}
    raise UnsupportedError(f"{where}: {arch}.rope.scaling.type {kind!r} is not supported for HF/MLX outputs "
                           "(linear, yarn)")


def _generation_config(ids: dict[str, int]) -> str:
    """bos, eos (with the end-of-turn token when it differs, as Llama 3 ships it) and pad."""
    import json

    eos = sorted({ids[role] for role in ("eos", "eot") if role in ids})
    cfg = {"bos_token_id": ids.get("bos"), "eos_token_id": (eos[0] if len(eos) == 1 else eos) or None,
           "pad_token_id": ids.get("pad")}
    return json.dumps({k: v for k, v in cfg.items() if v is not None}, indent=2)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of gguf.permute_qk: per head, rows [x0, y0, x1, y1, ...] -> [x0..x{d/2-1}, y0..]."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def qk_heads(plan: HFPlan, hf_name: str) -> int | None:
    """The head count whose row order llama.cpp changed in this tensor (Llama q/k), else None."""
    if plan.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return plan.n_head
    if plan.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return plan.n_head_kv
    return None


class GGUFAsHF(Checkpoint):
    """A GGUF checkpoint seen as the HF checkpoint its export would write (hf_plan: HF names and config, q/k
    rows in HF's order, quantized tensors dequantized to float32), read lazily tensor by tensor, for what
    takes HF checkpoints (merging PEFT LoRA adapters into a GGUF base). Only the tokenizer files are
    written, to a temporary folder that close() removes."""

    format = "hf"

    def __init__(self, ckpt: GGUFCheckpoint, plan: HFPlan | None = None):
        self.gguf, self.plan = ckpt, plan or hf_plan(ckpt)
        self.path, self.config = ckpt.path, self.plan.config
        self.arch = self.config["model_type"]
        self._gguf_names = {hf: g for g, hf in self.plan.names.items() if g in ckpt.tensors}
        self.tensors = {t.name: TensorInfo(t.name, t.dtype, t.shape, int(np.prod(t.shape)) * _ITEMSIZE[t.dtype])
                        for t in self.plan.tensors}
        self.tokenizer_dir = Path(tempfile.mkdtemp(prefix="epicode-gguf-tokenizer-"))
        for name, text in self.plan.files.items():
            (self.tokenizer_dir / name).write_text(text, encoding="utf-8")

    def read(self, name: str) -> np.ndarray:
        g = self._gguf_names[name]
        stored = self.gguf.read(g) if self.gguf.tensors[g].dtype in FLOAT_TAGS else self.gguf.read_f32(g)
        n_head = qk_heads(self.plan, name)
        return stored if n_head is None else unpermute_qk(stored, n_head)

    def read_f32(self, name: str) -> np.ndarray:
        from .safetensors_io import to_f32

        return to_f32(self.read(name), self.tensors[name].dtype)

    def tokenizer_digests(self) -> dict[str, str]:
        d = self.tokenizer_dir
        return {f: sha256_file(d / f) for f in TOKENIZER_FILES if (d / f).is_file()}

    def close(self) -> None:
        shutil.rmtree(self.tokenizer_dir, ignore_errors=True)


_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}


class GGUFToHFSink(ClosingSink):
    """Streams one GGUF checkpoint into an HF folder at out_dir (HFSink underneath: same sharding, index,
    config.json); `write(gguf_name, storage_array)` in the checkpoint's tensor order, then `close()`."""

    def __init__(self, out_dir, ckpt: GGUFCheckpoint, max_shard_bytes: int = MAX_SHARD_BYTES,
                 plan: HFPlan | None = None):
        self.plan = plan or hf_plan(ckpt)
        self.out_dir = Path(out_dir)
        self._sink = HFSink(out_dir, self.plan.config, self.plan.tensors, None, max_shard_bytes)
        self._shapes = {t.name: t.shape for t in self.plan.tensors}
        self._held: list[np.ndarray] = []  # q/k rows waiting to make whole heads

    def write(self, gguf_name: str, array: np.ndarray) -> None:
        hf_name = self.plan.names[gguf_name]
        n_head = qk_heads(self.plan, hf_name)
        self._sink.write(hf_name, array if n_head is None else unpermute_qk(array, n_head))

    def write_rows(self, gguf_name: str, start: int, rows: np.ndarray) -> None:
        """Rows start:start+n of a tensor seen as (rows, last dim), pieces of one tensor in order (the pass's
        pieces): written as they come, except that Llama's q/k rows wait until they make whole heads (the row
        order is undone per head). Bytes are those write() gives for the whole tensor."""
        hf_name = self.plan.names[gguf_name]
        shape = self._shapes[hf_name]
        n_head = qk_heads(self.plan, hf_name)
        if n_head is None:
            self._sink.write_part(hf_name, rows)  # C-order bytes: the shape of the piece does not matter
            return
        if len(shape) == 1:  # a q/k bias is one row: whole
            self._sink.write_part(hf_name, unpermute_qk(rows.reshape(shape), n_head))
            return
        if start == 0:
            self._held = []
        self._held.append(rows)
        per_head = shape[0] // n_head
        held = sum(len(r) for r in self._held)
        if held >= per_head:
            block = np.concatenate(self._held) if len(self._held) > 1 else self._held[0]
            k = held // per_head * per_head
            self._sink.write_part(hf_name, unpermute_qk(block[:k], k // per_head))
            self._held = [block[k:]] if k < held else []

    def close(self) -> Path:
        out = self._sink.close()
        for name, text in self.plan.files.items():
            (out / name).write_text(text, encoding="utf-8")
        return out

    def abort(self) -> None:
        self._sink.abort()
