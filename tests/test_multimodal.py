"""Multimodal checkpoints converted as their text model (converters/multimodal.py): the config a real Gemma 3
4B release ships (text_config listing only what differs from the defaults) read as transformers reads it, and
the tensor names of both transformers layouts. The numerics (llama.cpp, MLX, transformers' forward, llama.cpp's
own converter) are in tests/test_reference_transformers.py's gemma3 case."""

from __future__ import annotations

import json

import numpy as np
import pytest

from epicode_edge.converters.checkpoint import HFCheckpoint
from epicode_edge.converters.gguf import check_gguf_export, hparams, rope_parameters
from epicode_edge.converters.gguf_arch import GEMMA3, sliding_layers
from epicode_edge.converters.multimodal import text_config, text_tensor_name
from epicode_edge.converters.safetensors_io import write_safetensors
from epicode_edge.errors import EpicodeError, InputError

# google/gemma-3-4b-it's config.json, as released (transformers 4.50): the text model's keys that differ from
# Gemma3TextConfig's defaults only
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "torch_dtype": "bfloat16",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False},
}


def test_sparse_text_config_reads_as_transformers_reads_it():
    transformers = pytest.importorskip("transformers")
    ours = text_config(GEMMA3_4B)
    ref = transformers.Gemma3Config(**GEMMA3_4B).text_config.to_dict()
    assert ours["model_type"] == ref["model_type"] == "gemma3_text"

    def same_form(hp):  # transformers 5 repeats rope_theta inside the rope dict; hp["rope_theta"] has it
        return dict(hp, **{k: {a: b for a, b in hp[k].items() if a != "rope_theta"} for k in ("rope", "rope_all")})

    assert same_form(hparams(ours)) == same_form(hparams(ref))  # every hyperparameter the GGUF export writes
    assert hparams(ours)["rope_theta"] == hparams(ref)["rope_theta"] == 1_000_000.0  # global layers, linear x8
    assert hparams(ours)["rope"] == {"rope_type": "linear", "factor": 8.0}
    assert rope_parameters(ours)[1] == rope_parameters(ref)[1] == 10_000.0  # the sliding layers' base
    assert sliding_layers(ours, GEMMA3) == sliding_layers(ref, GEMMA3)  # 5 sliding, then 1 global
    for key in ("query_pre_attn_scalar", "sliding_window", "hidden_activation", "final_logit_softcapping",
                "attn_logit_softcapping", "tie_word_embeddings"):
        assert ours[key] == ref[key], key
    check_gguf_export(ours)  # llama.cpp runs it as transformers does
    assert ours["torch_dtype"] == "bfloat16" and ours["architectures"] == ["Gemma3ForCausalLM"]


def test_text_config_missing_is_one_line():
    with pytest.raises(InputError, match="config.json: field 'text_config' must be an object"):
        text_config({"model_type": "gemma3"})


@pytest.mark.parametrize("stored, text", [
    ("model.language_model.layers.3.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"),  # transformers >= 4.52
    ("language_model.model.layers.3.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"),  # earlier releases
    ("language_model.model.embed_tokens.weight", "model.embed_tokens.weight"),
    ("language_model.lm_head.weight", "lm_head.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", None),
    ("model.vision_tower.vision_model.post_layernorm.weight", None),
    ("multi_modal_projector.mm_input_projection_weight", None),
    ("model.multi_modal_projector.mm_soft_emb_norm.weight", None),
])
def test_tensor_names(stored, text):
    assert text_tensor_name(stored) == text


def _folder(root, names: list[str], config: dict):
    root.mkdir()
    (root / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    write_safetensors(root / "model.safetensors", {n: (rng.standard_normal((4, 8)).astype(np.float32), "F32")
                                                   for n in names})
    return root


def test_checkpoint_reads_the_language_model_by_its_text_names(tmp_path):
    cfg = dict(GEMMA3_4B, text_config=dict(GEMMA3_4B["text_config"], num_hidden_layers=1))
    names = ["language_model.model.embed_tokens.weight", "language_model.model.layers.0.mlp.up_proj.weight",
             "vision_tower.vision_model.embeddings.patch_embedding.weight",
             "multi_modal_projector.mm_input_projection_weight"]
    d = _folder(tmp_path / "old", names, cfg)
    with HFCheckpoint(d) as ck:
        assert (ck.arch, ck.multimodal) == ("gemma3_text", "gemma3")
        assert sorted(ck.tensors) == ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"]
        from epicode_edge.converters.safetensors_io import SafetensorsFile

        st = SafetensorsFile(d / "model.safetensors")
        try:
            assert np.array_equal(ck.read("model.layers.0.mlp.up_proj.weight"),
                                  st.read("language_model.model.layers.0.mlp.up_proj.weight"))
        finally:
            st.close()
    d = _folder(tmp_path / "odd", names[:1] + ["encoder.layers.0.weight"], cfg)
    with pytest.raises(EpicodeError, match="tensor 'encoder.layers.0.weight' is neither the language model's nor "
                                           "the vision tower's of a gemma3 checkpoint"):
        HFCheckpoint(d)
    d = _folder(tmp_path / "twice", names[:1] + ["language_model.lm_head.weight", "lm_head.weight"], cfg)
    with pytest.raises(EpicodeError, match="stored twice"):
        HFCheckpoint(d)
