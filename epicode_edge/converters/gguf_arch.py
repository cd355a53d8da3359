"""The per-architecture part of the HF -> GGUF export for Gemma 2, Gemma 3 (text) and Phi-3: the metadata keys,
the tensor changes and the extra tensors, as llama.cpp's own converter writes them (convert_hf_to_gguf.py:
Gemma2Model, Gemma3Model, Phi3MiniModel), and the configs llama.cpp would run differently from transformers,
refused in one line. Llama, Mistral, Qwen2 and Qwen3 are handled in converters/gguf.py.

    check_layout(config, hp, arch)               # UnsupportedError / InputError naming the config field
    add_arch_hparams(writer, config, hp, arch)
    x = tensor_for_gguf(arch, hf_name, x)        # Gemma's RMSNorm weights stored as 1 + w
    extra = extra_tensors(config, hp, arch)      # Phi-3's longrope factors

The rest of the layout needs nothing here: gguf-py's tensor-name table maps Gemma's four norms per layer and
Phi-3's fused qkv_proj / gate_up_proj (kept fused, as attn_qkv / ffn_up); llama.cpp scales Gemma's token
embeddings by sqrt(hidden_size) itself; tied embeddings are read from token_embd.
"""

from __future__ import annotations

import math

import gguf
import numpy as np

from ..errors import InputError, UnsupportedError

GEMMA2, GEMMA3, PHI3 = gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3, gguf.MODEL_ARCH.PHI3
ARCHS = (GEMMA2, GEMMA3, PHI3)

# llama.cpp's sliding-window layer pattern when the file names none (its gemma2 and gemma3 models,
# load_swa_pattern): every n-th layer global, the others sliding.
_DEFAULT_SWA_PATTERN = {GEMMA2: 2, GEMMA3: 6}
# llama.cpp's query scale for Gemma (its gemma2 and gemma3 models, f_attention_scale): 1/sqrt(head_dim), except
# the 27B models (recognised by their layer count), which use 1/sqrt(hidden_size / num_attention_heads).
_HIDDEN_PER_HEAD_SCALE_LAYERS = {GEMMA2: 46, GEMMA3: 62}


def sliding_layers(config: dict, arch: gguf.MODEL_ARCH, where: str = "config.json") -> list[bool]:
    """Which layers use sliding-window attention, as transformers decides it (layer_types, else every
    sliding_window_pattern-th layer global)."""
    n = int(config["num_hidden_layers"])
    types = config.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n or not set(types) <= {"sliding_attention", "full_attention"}:
            raise InputError(f"{where}: field 'layer_types' must list 'sliding_attention' or 'full_attention' "
                             f"for each of the {n} layers")
        return [t == "sliding_attention" for t in types]
    if config.get("sliding_window") is None:
        return [False] * n
    every = config.get("sliding_window_pattern", config.get("_sliding_window_pattern", _DEFAULT_SWA_PATTERN[arch]))
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise InputError(f"{where}: field 'sliding_window_pattern' must be an integer >= 1, got {every!r}")
    return [bool((i + 1) % every) for i in range(n)]


def check_layout(config: dict, hp: dict, arch: gguf.MODEL_ARCH, where: str = "config.json") -> None:
    """Refuse, naming the field, what llama.cpp would run differently from transformers."""
    if arch in (GEMMA2, GEMMA3):
        _check_gemma(config, hp, arch, where)
    elif arch == PHI3:
        _phi3_rope(config, hp, where)


def _check_gemma(config: dict, hp: dict, arch, where: str) -> None:
    if arch == GEMMA2:
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            v = config.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise UnsupportedError(f"{where}: field {key!r} is {v!r}; llama.cpp's gemma2 always soft-caps "
                                       "and needs a number > 0")
    else:
        if config.get("attn_logit_softcapping") is not None:
            raise UnsupportedError(f"{where}: field 'attn_logit_softcapping' is set; llama.cpp's gemma3 has no "
                                   "attention soft-capping")
        kind = hp["rope"].get("rope_type")
        if kind not in (None, "linear"):
            raise UnsupportedError(f"{where}: rope_scaling type {kind!r} is not supported for gemma3 (linear)")
    if any(sliding_layers(config, arch, where)) and not isinstance(config.get("sliding_window"), int):
        raise InputError(f"{where}: field 'sliding_window' must be an integer, got {config.get('sliding_window')!r}")
    scalar = config.get("query_pre_attn_scalar")
    if scalar is not None:
        wide = hp["n_layer"] == _HIDDEN_PER_HEAD_SCALE_LAYERS[arch]
        used = hp["n_embd"] / hp["n_head"] if wide else hp["head_dim"]
        if not math.isclose(float(scalar), used):
            raise UnsupportedError(
                f"{where}: query_pre_attn_scalar {scalar} differs from the "
                f"{'hidden_size / num_attention_heads' if wide else 'head_dim'} {used:g} that llama.cpp's "
                f"{gguf.MODEL_ARCH_NAMES[arch]} scales queries by")


def _phi3_rope(config: dict, hp: dict, where: str = "config.json") -> dict:
    """Phi-3's rope: (dimension count, original context, long/short factors or None, attention factor)."""
    rope = hp["rope_all"]
    n_ctx = hp["n_ctx"]
    orig = config.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or n_ctx
    part = float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) or 1.0)
    dims = int(part * hp["n_embd"]) // hp["n_head"]
    out = {"dims": dims, "orig_ctx": int(orig), "long": None, "short": None, "attn_factor": None}
    kind = str(rope.get("rope_type") or "default").lower()
    if not rope.get("long_factor"):
        if kind not in ("default", "longrope", "su"):
            raise UnsupportedError(f"{where}: rope_scaling type {kind!r} is not supported for phi3 (longrope)")
        return out
    if kind not in ("longrope", "su"):
        raise UnsupportedError(f"{where}: rope_scaling type {kind!r} with long_factor is not supported for phi3 "
                               "(longrope)")
    long, short = rope.get("long_factor"), rope.get("short_factor")
    for key, v in (("long_factor", long), ("short_factor", short)):
        if not isinstance(v, list) or len(v) != dims // 2:
            raise InputError(f"{where}: rope_scaling {key} must list {dims // 2} numbers (rotary dims / 2)")
    scale = n_ctx / out["orig_ctx"]
    out["attn_factor"] = math.sqrt(1 + math.log(scale) / math.log(out["orig_ctx"])) if scale > 1.0 else 1.0
    out["long"], out["short"] = np.array(long, np.float32), np.array(short, np.float32)  # (dims/2,) each
    return out


def add_shape_hparams(w: gguf.GGUFWriter, hp: dict) -> None:
    """The keys every architecture writes first (convert_hf_to_gguf's TextModel.set_gguf_parameters)."""
    w.add_context_length(hp["n_ctx"])
    w.add_embedding_length(hp["n_embd"])
    w.add_block_count(hp["n_layer"])
    w.add_feed_forward_length(hp["n_ff"])
    w.add_head_count(hp["n_head"])
    w.add_head_count_kv(hp["n_head_kv"])


def add_arch_hparams(w: gguf.GGUFWriter, config: dict, hp: dict, arch: gguf.MODEL_ARCH) -> None:
    """The architecture keys of Gemma2Model / Gemma3Model / Phi3MiniModel (same keys and values)."""
    add_shape_hparams(w, hp)
    w.add_layer_norm_rms_eps(hp["rms_eps"])
    if arch == PHI3:
        rope = _phi3_rope(config, hp)
        w.add_rope_scaling_orig_ctx_len(rope["orig_ctx"])
        w.add_rope_dimension_count(rope["dims"])
        w.add_rope_freq_base(float(hp["rope_theta"] if hp["rope_theta"] is not None else 10000.0))
        w.add_sliding_window(int(config.get("sliding_window") or 0))  # llama.cpp runs phi3 without it
        if rope["attn_factor"] is not None:
            w.add_rope_scaling_attn_factors(rope["attn_factor"])
        return
    w.add_key_length(hp["head_dim"])
    w.add_value_length(hp["head_dim"])
    if hp["rope_theta"] is not None:
        w.add_rope_freq_base(float(hp["rope_theta"]))
    if arch == GEMMA2:
        w.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
        w.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    else:
        if hp["rope_theta_swa"] is not None:
            w.add_rope_freq_base_swa(float(hp["rope_theta_swa"]))
        if config.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
        if hp["rope"].get("rope_type") == "linear":  # the global layers' (Gemma 3 4B and larger)
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(hp["rope"]["factor"]))
    sliding = sliding_layers(config, arch)
    if any(sliding):
        w.add_sliding_window(int(config["sliding_window"]))
        every = _DEFAULT_SWA_PATTERN[arch]
        if sliding != [bool(i % every < every - 1) for i in range(len(sliding))]:
            w.add_sliding_window_pattern(sliding)  # per layer; llama.cpp's default pattern is written as nothing
    elif arch == GEMMA2:
        w.add_sliding_window(0)


def tensor_for_gguf(arch: gguf.MODEL_ARCH, hf_name: str, x: np.ndarray) -> np.ndarray:
    """The tensor as llama.cpp stores it: Gemma's RMSNorm computes x * (1 + w), llama.cpp's x * w."""
    if arch in (GEMMA2, GEMMA3) and hf_name.endswith("norm.weight"):
        return x + np.float32(1.0)
    return x


def extra_tensors(config: dict, hp: dict, arch: gguf.MODEL_ARCH) -> dict[str, np.ndarray]:
    """GGUF tensors made from the config: Phi-3's longrope factors (rope_factors_long / _short)."""
    if arch != PHI3:
        return {}
    rope = _phi3_rope(config, hp)
    if rope["long"] is None:
        return {}
    name = gguf.TENSOR_NAMES
    return {name[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight": rope["long"],
            name[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight": rope["short"]}
