"""Multimodal checkpoints whose text model the tool converts: that model's config and tensor names.

    if is_multimodal(config):
        config = text_config(config, where)        # the text model's config.json, defaults filled in
        name = text_tensor_name(stored_name)       # its own name for a tensor; None: not the text model's

Gemma 3 4B, 12B and 27B (model_type gemma3, Gemma3ForConditionalGeneration) and their finetunes hold a Gemma 3
text model beside a SigLIP vision tower and a projector. As llama.cpp's converter does (convert_hf_to_gguf.py,
Gemma3Model: the text_config keys over the top-level ones; the vision tower goes to a separate mmproj file that
the tool does not write), the tool converts the text model alone: its config is text_config with the defaults
of transformers' Gemma3TextConfig for the keys a multimodal config leaves out (real ones list only those that
differ), and its tensors are the language model's, named as Gemma3ForCausalLM names them. The bundle's models
are text models (gemma3_text): prompts are text, as the chat and the server take them.
"""

from __future__ import annotations

from ..errors import InputError

TEXT_MODELS = {"gemma3": "gemma3_text"}  # multimodal model_type -> the model_type of its text model

# transformers' Gemma3TextConfig defaults for what a multimodal config's text_config may leave out
# (transformers/models/gemma3/configuration_gemma3.py); the rope bases in the pre-rope_parameters form, which
# converters/gguf.py's rope_parameters reads as well
_GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "pad_token_id": 0, "eos_token_id": 1,
    "bos_token_id": 2, "tie_word_embeddings": True, "attention_bias": False, "attention_dropout": 0.0,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
}
_GEMMA3_ROPE_DEFAULTS = {"rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0}

# stored name prefix -> the text model's (transformers >= 4.52 saves model.language_model.*, earlier releases
# language_model.model.*); the vision tower's and the projector's tensors are left out
_RENAME = (("model.language_model.", "model."), ("language_model.model.", "model."),
           ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))
_OTHER = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def is_multimodal(config: dict) -> bool:
    return config.get("model_type") in TEXT_MODELS


def text_config(config: dict, where: str = "config.json") -> dict:
    """The text model's config.json of a multimodal config (InputError naming the field when it has none)."""
    tc = config.get("text_config")
    if not isinstance(tc, dict):
        raise InputError(f"{where}: field 'text_config' must be an object (the text model's config of a "
                         f"{config.get('model_type')} checkpoint)")
    out = dict(_GEMMA3_TEXT_DEFAULTS)
    if "rope_parameters" not in tc:
        out.update(_GEMMA3_ROPE_DEFAULTS)
    if "layer_types" not in tc:
        out["sliding_window_pattern"] = 6
    out.update(tc)
    for key in ("torch_dtype", "dtype"):  # the weights' dtype, kept at the top level
        if key in config and key not in tc:
            out[key] = config[key]
    out["model_type"] = TEXT_MODELS[config["model_type"]]
    out["architectures"] = ["Gemma3ForCausalLM"]
    return out


def text_tensor_name(name: str) -> str | None:
    """The text model's name of a stored tensor; None for the vision tower's and the projector's. ValueError
    for a tensor that is neither."""
    if name.startswith(_OTHER):
        return None
    for old, new in _RENAME:
        if name.startswith(old):
            return new + name[len(old):]
    raise ValueError(name)
