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


# ------------------------------------------------------------------ PEFT LoRA of a multimodal Gemma 3

MU, R, ALPHA = 0.5, 4, 8.0
IDS = [1, 17, 42, 99, 7, 256, 3, 64, 200, 11]
LANG = "model.language_model.layers.{}.self_attn.{}_proj"  # as PEFT names a module of the whole model
VISION = "model.vision_tower.encoder.layers.0.self_attn.q_proj"


def _tiny_gemma3(root):
    """A tiny Gemma3ForConditionalGeneration made by transformers (random weights of a size that spreads the
    logits), with a SentencePiece tokenizer."""
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("transformers")
    from factory import make_spm_tokenizer

    text = T.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, vocab_size=512,
                              max_position_embeddings=512, sliding_window=4, bos_token_id=1, eos_token_id=2,
                              pad_token_id=None, layer_types=["sliding_attention", "full_attention"])
    vision = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=28, patch_size=14)
    cfg = T.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=511,
                         boi_token_index=509, eoi_token_index=510)
    model = T.Gemma3ForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g) if p.ndim == 1 else
                    torch.randn(p.shape, generator=g) * (1.5 / p.shape[-1] ** 0.5))
    model.save_pretrained(root, safe_serialization=True)
    tok = make_spm_tokenizer(root.parent / "tok")
    for f in tok.iterdir():
        (root / f.name).write_bytes(f.read_bytes())
    return root


def _peft_adapter(root, base, seed: int) -> dict:
    """A PEFT LoRA folder over the whole model: q/v of both language layers and one vision-tower projection.
    Returns module -> (A (r, in), B (out, r))."""
    rng = np.random.default_rng(seed)
    mods = {LANG.format(i, p): (64 if p == "q" else 32, 64) for i in (0, 1) for p in ("q", "v")}
    mods[VISION] = (32, 32)
    pairs, tensors = {}, {}
    for m, (out_f, in_f) in mods.items():
        a = (rng.standard_normal((R, in_f)) / np.sqrt(in_f)).astype(np.float32)
        b = (0.5 * rng.standard_normal((out_f, R))).astype(np.float32)
        pairs[m] = (a, b)
        tensors[f"base_model.model.{m}.lora_A.weight"] = (a, "F32")
        tensors[f"base_model.model.{m}.lora_B.weight"] = (b, "F32")
    root.mkdir()
    write_safetensors(root / "adapter_model.safetensors", tensors)
    (root / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM"}))
    return pairs


def test_peft_lora_of_multimodal_gemma3_merges_over_its_text_model(tmp_path):
    """PEFT adapters of the whole Gemma3ForConditionalGeneration (as TRL/Unsloth train Gemma 3 4B): their
    language-model targets apply to the text model (the vision tower's are dropped); the expert's llama.cpp
    logits, merged or as a shared-base bundle, equal transformers' forward of the whole model with W + s B A
    merged and extrapolated in torch."""
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("transformers")
    from cli_helpers import cli
    from gguf_helpers import llama_last_logits, llama_model

    base = _tiny_gemma3(tmp_path / "base")
    ft, inf = _peft_adapter(tmp_path / "ft", base, 1), _peft_adapter(tmp_path / "inf", base, 2)
    code, out = cli("convert", "--base", base, "--finetuned", tmp_path / "ft", "--inferior", tmp_path / "inf",
                    "--mu", MU, "--merge", "--quant", "F32", "-o", tmp_path / "b")
    assert code == 0, out
    model = T.Gemma3ForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    params = dict(model.named_parameters())
    s = ALPHA / R
    with torch.no_grad():
        for m in ft:
            w = params[m + ".weight"]
            w_ft = w + s * torch.from_numpy(ft[m][1] @ ft[m][0])
            w_inf = w + s * torch.from_numpy(inf[m][1] @ inf[m][0])
            w.copy_(w_ft + MU * (w_ft - w_inf))
        model.eval()
        want = model(torch.tensor([IDS])).logits[0, -1].float().numpy()
    llm = llama_model(tmp_path / "b" / "gguf" / "expert-F32.gguf")
    try:
        got = llama_last_logits(llm, IDS)
    finally:
        llm.close()
    scale = float(np.abs(want).max())
    assert scale > 1.0 and float(np.abs(got - want).max()) <= 1e-3 * scale  # Gemma on llama.cpp: 1e-3 (GELU)
    # without --merge: a shared-base bundle (the text model's GGUF and the two adapters, applied by llama.cpp)
    code, out = cli("convert", "--base", base, "--finetuned", tmp_path / "ft", "--inferior", tmp_path / "inf",
                    "--mu", MU, "--quant", "F32", "-o", tmp_path / "c")
    assert code == 0, out
    from epicode_edge.runtime import load

    with load(tmp_path / "c", n_ctx=128, n_threads=1, kv_type="f32") as rt:
        assert rt.bundle.manifest["layout"] == "shared-base"
        shared = rt.expert.prefill(IDS).copy()
    assert float(np.abs(shared - want).max()) <= 1e-3 * scale
