"""config.json against the weights, before anything is written: the fields every export reads (types and
ranges), and the shape of every tensor those fields imply (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3
text and Phi-3 layouts).

    check_config_shapes(ckpt)        # HF checkpoint; MismatchError / CheckpointError naming field or tensor

A config that does not match its weights would otherwise give a bundle that no engine loads (8 layers
announced for 4 stored), or a traceback deep in an exporter (`num_attention_heads: 0`, `rms_norm_eps: "abc"`).
"""

from __future__ import annotations

import math
import re

from ..errors import CheckpointError, MismatchError

INT_MAX = 2**31 - 1
LAYOUT_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")  # the tensor layouts below
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _int(config: dict, where: str, *keys: str, required: bool = True, lo: int = 1, hi: int = INT_MAX):
    key = next((k for k in keys if config.get(k) is not None), None)
    if key is None:
        if required:
            raise CheckpointError(f"{where}: field {keys[0]!r} is missing")
        return None
    v = config[key]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise CheckpointError(f"{where}: field {key!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _positive_number(config: dict, where: str, key: str, required: bool):
    v = config.get(key)
    if v is None:
        if required:
            raise CheckpointError(f"{where}: field {key!r} is missing")
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise CheckpointError(f"{where}: field {key!r} must be a finite number > 0, got {v!r}")
    return v


def config_fields(config: dict, where: str = "config.json", for_gguf: bool = True) -> dict:
    """The hyperparameters, checked: (hidden, layers, heads, kv_heads, head_dim, intermediate, vocab, ...).
    for_gguf: also require what only the GGUF export reads (max_position_embeddings, rms_norm_eps); HF and
    MLX outputs keep transformers' defaults for them, so there they are checked only when present."""
    hidden = _int(config, where, "hidden_size", "n_embd")
    layers = _int(config, where, "num_hidden_layers", "n_layer", hi=100_000)
    heads = _int(config, where, "num_attention_heads", "n_head", hi=100_000)
    kv = _int(config, where, "num_key_value_heads", required=False, hi=100_000) or heads
    if heads % kv:
        raise CheckpointError(f"{where}: num_key_value_heads {kv} does not divide num_attention_heads {heads}")
    head_dim = _int(config, where, "head_dim", required=False, hi=1 << 16)
    if head_dim is None:
        if hidden % heads:
            raise CheckpointError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        head_dim = hidden // heads
    fields = {
        "hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv, "head_dim": head_dim,
        "intermediate": _int(config, where, "intermediate_size", "n_inner"),
        "vocab": _int(config, where, "vocab_size"),
        "n_ctx": _int(config, where, "max_position_embeddings", "n_positions", "n_ctx", required=for_gguf),
        "rms_eps": _positive_number(config, where, "rms_norm_eps", required=for_gguf),
        "rope_theta": _positive_number(config, where, "rope_theta", required=False),
    }
    tied = config.get("tie_word_embeddings", False)
    if tied is not None and not isinstance(tied, bool):
        raise CheckpointError(f"{where}: field 'tie_word_embeddings' must be true or false, got {tied!r}")
    return fields


def expected_shapes(arch: str, f: dict, names) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape the config implies, for the tensors the layout needs (biases when present,
    and Qwen2's always; Qwen3's and Gemma 3's q/k norms; Gemma's four norms per layer; Phi-3's fused qkv and
    gate_up projections)."""
    H, I, V, hd = f["hidden"], f["intermediate"], f["vocab"], f["head_dim"]
    q, kv = f["heads"] * hd, f["kv_heads"] * hd
    want = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if "lm_head.weight" in names:
        want["lm_head.weight"] = (V, H)
    for i in range(f["layers"]):
        p = f"model.layers.{i}."
        if arch == "phi3":  # fused projections: q, k, v rows stacked; gate and up rows stacked
            want.update({
                p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                p + "self_attn.qkv_proj.weight": (q + 2 * kv, H), p + "self_attn.o_proj.weight": (H, q),
                p + "mlp.gate_up_proj.weight": (2 * I, H), p + "mlp.down_proj.weight": (H, I),
            })
            continue
        if arch in ("gemma2", "gemma3_text"):  # a norm before and after attention and feed-forward
            want[p + "pre_feedforward_layernorm.weight"] = (H,)
            want[p + "post_feedforward_layernorm.weight"] = (H,)
        want.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
            p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
        })
        for proj, n in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            if arch == "qwen2" or p + f"self_attn.{proj}.bias" in names:
                want[p + f"self_attn.{proj}.bias"] = (n,)
        if arch in ("qwen3", "gemma3_text"):
            want[p + "self_attn.q_norm.weight"] = (hd,)
            want[p + "self_attn.k_norm.weight"] = (hd,)
    return want


def check_config_shapes(ckpt, for_gguf: bool = True) -> None:
    """An HF checkpoint's config.json agrees with its tensors; raises naming the field or tensor."""
    where = str(ckpt.path / "config.json")
    f = config_fields(ckpt.config, where, for_gguf)
    if ckpt.arch not in LAYOUT_ARCHS:
        return
    tensors = ckpt.tensors
    stored = sorted({int(m[1]) for n in tensors if (m := _LAYER.match(n))})
    if stored != list(range(f["layers"])):
        have = f"{len(stored)} layers (model.layers.{stored[0]} to {stored[-1]})" if stored else "no layers"
        raise MismatchError(f"{where}: num_hidden_layers is {f['layers']} but the weights have {have}")
    for name, shape in expected_shapes(ckpt.arch, f, tensors).items():
        info = tensors.get(name)
        if info is None:
            raise MismatchError(f"{where}: model_type {ckpt.arch!r} needs tensor {name!r}, which the weights lack "
                                "(a config of another architecture?)")
        if tuple(info.shape) != shape:
            raise MismatchError(f"{where}: tensor {name!r} has shape {list(info.shape)}, the config implies "
                                f"{list(shape)} ({_fields_of(name)})")
    if ckpt.arch in ("llama", "mistral", "qwen2"):
        extra = next((n for n in tensors if n.endswith(("q_norm.weight", "k_norm.weight"))), None)
        if extra is not None:
            raise MismatchError(f"{where}: tensor {extra!r} does not belong to model_type {ckpt.arch!r} "
                                "(Qwen3 weights? set model_type to qwen3)")


def _fields_of(name: str) -> str:
    if "embed_tokens" in name or "lm_head" in name:
        return "vocab_size x hidden_size"
    if "mlp." in name:
        return "intermediate_size, hidden_size"
    if "self_attn" in name:
        return "num_attention_heads / num_key_value_heads x head_dim, hidden_size"
    return "hidden_size"
