"""Gemma 2, Gemma 3 (text) and Phi-3 HF checkpoints: what llama.cpp or mlx_lm would run differently from
transformers is refused in one line naming the field or tensor, before anything is written; a Gemma 3 layer
pattern other than llama.cpp's default is written per layer. (Their numerics: tests/test_reference_transformers.py.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import assert_one_line_error, cli
from factory import make_spm_tokenizer

from epicode_edge.converters.safetensors_io import write_safetensors

H, I, V, HD, LAYERS = 64, 128, 512, 16, 2


def tiny_weights(arch: str, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named float32 weights of the layout transformers' Gemma2/Gemma3/Phi3 ForCausalLM saves."""
    rng = np.random.default_rng(seed)
    q, kv = 4 * HD, 2 * HD
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                       p + "self_attn.o_proj.weight": (H, q), p + "mlp.down_proj.weight": (H, I)})
        if arch == "phi3":
            shapes.update({p + "self_attn.qkv_proj.weight": (q + 2 * kv, H), p + "mlp.gate_up_proj.weight": (2 * I, H)})
            continue
        shapes.update({p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
                       p + "self_attn.v_proj.weight": (kv, H), p + "mlp.gate_proj.weight": (I, H),
                       p + "mlp.up_proj.weight": (I, H), p + "pre_feedforward_layernorm.weight": (H,),
                       p + "post_feedforward_layernorm.weight": (H,)})
        if arch == "gemma3_text":
            shapes.update({p + "self_attn.q_norm.weight": (HD,), p + "self_attn.k_norm.weight": (HD,)})
    if arch == "phi3":
        shapes["lm_head.weight"] = (V, H)
    return {n: (0.1 * rng.standard_normal(s)).astype(np.float32) for n, s in shapes.items()}


def tiny_config(arch: str) -> dict:
    cfg = {"model_type": arch, "vocab_size": V, "hidden_size": H, "intermediate_size": I, "num_hidden_layers": LAYERS,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
           "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    if arch == "gemma2":
        cfg.update(architectures=["Gemma2ForCausalLM"], head_dim=HD, query_pre_attn_scalar=HD, sliding_window=4,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, tie_word_embeddings=True,
                   hidden_activation="gelu_pytorch_tanh", rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    elif arch == "gemma3_text":
        cfg.update(architectures=["Gemma3ForCausalLM"], head_dim=HD, query_pre_attn_scalar=HD, sliding_window=4,
                   tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
                   layer_types=["sliding_attention", "sliding_attention"],
                   rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    else:
        cfg.update(architectures=["Phi3ForCausalLM"], tie_word_embeddings=False, hidden_act="silu",
                   original_max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    return cfg


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory) -> Path:
    return make_spm_tokenizer(tmp_path_factory.mktemp("spm") / "tok")


def make_model(root: Path, arch: str, tok: Path, seed: int = 0, **config) -> Path:
    out = root / f"model-{seed}"  # (the GGUF's general.name: llama.cpp wants <s>, </s>, <unk> when it holds "phi3")
    out.mkdir(parents=True)
    write_safetensors(out / "model.safetensors", {n: (a, "F32") for n, a in tiny_weights(arch, seed).items()})
    (out / "config.json").write_text(json.dumps({**tiny_config(arch), **config}))
    for f in tok.iterdir():
        shutil.copy(f, out)
    return out


def run_convert(ft: Path, inf: Path, out: Path, to: str = "gguf"):
    return cli("convert", "--finetuned", ft, "--inferior", inf, "--mu", "0.5", "--to", to, "--quant", "F32", "-o", out)


@pytest.mark.parametrize("arch, config, expect", [
    ("gemma2", {"attn_logit_softcapping": None}, ["'attn_logit_softcapping' is None", "always soft-caps"]),
    ("gemma2", {"query_pre_attn_scalar": 144}, ["query_pre_attn_scalar 144 differs from the head_dim 16"]),
    ("gemma3_text", {"attn_logit_softcapping": 50.0}, ["'attn_logit_softcapping' is set"]),
    ("gemma3_text", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}},
     ["rope_scaling type 'yarn' is not supported for gemma3"]),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "long_factor": [1.0] * 3,
                                  "short_factor": [1.0] * 3}}, ["long_factor must list 8 numbers"]),
    ("phi3", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     ["rope_scaling type 'dynamic' is not supported for phi3"]),
    ("gemma3", {}, ["field 'text_config' must be an object (the text model's config of a gemma3 checkpoint)"]),
])
def test_config_llama_cpp_would_run_differently_is_refused(tmp_path, spm_tok, arch, config, expect):
    model_type = {"model_type": arch}
    layout = "gemma3_text" if arch == "gemma3" else arch
    ft = make_model(tmp_path, layout, spm_tok, 0, **config, **model_type)
    inf = make_model(tmp_path, layout, spm_tok, 1, **config, **model_type)
    code, output = run_convert(ft, inf, tmp_path / "b")
    assert_one_line_error(code, output, "config.json", *expect)
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b*"))


def test_wrong_fused_tensor_shape_is_named(tmp_path, spm_tok):
    ft = make_model(tmp_path, "phi3", spm_tok, 0)
    inf = make_model(tmp_path, "phi3", spm_tok, 1)
    for d in (ft, inf):
        w = tiny_weights("phi3")
        w["model.layers.1.self_attn.qkv_proj.weight"] = w["model.layers.1.self_attn.qkv_proj.weight"][:96]
        write_safetensors(d / "model.safetensors", {n: (a, "F32") for n, a in w.items()})
    code, output = run_convert(ft, inf, tmp_path / "b")
    assert_one_line_error(code, output, "'model.layers.1.self_attn.qkv_proj.weight' has shape [96, 64]",
                          "the config implies [128, 64]")


def test_tokenizer_that_cannot_be_written_is_refused(tmp_path, spm_tok):
    ft = make_model(tmp_path, "gemma2", spm_tok, 0)
    inf = make_model(tmp_path, "gemma2", spm_tok, 1)
    for d in (ft, inf):
        (d / "tokenizer.model").unlink()
        tj = json.loads((d / "tokenizer.json").read_text())
        tj["model"] = {"type": "WordPiece", "vocab": {"[UNK]": 0, "a": 1}, "unk_token": "[UNK]"}
        (d / "tokenizer.json").write_text(json.dumps(tj))
    code, output = run_convert(ft, inf, tmp_path / "b")
    assert_one_line_error(code, output, "tokenizer.json: tokenizer model 'WordPiece' is not supported")
    assert not (tmp_path / "b").exists()


def test_gemma3_layer_pattern_written_per_layer_and_refused_for_mlx(tmp_path, spm_tok):
    """A global layer where llama.cpp's default pattern (every 6th) has a sliding one: the GGUF names each
    layer's kind; mlx_lm's gemma3_text takes only a global layer every n-th, so [global, sliding] is refused."""
    import gguf

    types = {"layer_types": ["full_attention", "sliding_attention"]}
    ft = make_model(tmp_path, "gemma3_text", spm_tok, 0, **types)
    inf = make_model(tmp_path, "gemma3_text", spm_tok, 1, **types)
    code, output = run_convert(ft, inf, tmp_path / "m", to="mlx")
    assert_one_line_error(code, output, "layer_types has no global layer every n-th layer")
    assert not (tmp_path / "m").exists()
    code, output = run_convert(ft, inf, tmp_path / "b")
    assert code == 0, output
    r = gguf.GGUFReader(tmp_path / "b" / "gguf" / "expert-F32.gguf")
    assert r.fields["gemma3.attention.sliding_window_pattern"].contents() == [False, True]
    assert r.fields["gemma3.attention.sliding_window"].contents() == 4


def test_gemma_norms_are_stored_plus_one(tmp_path, spm_tok):
    """Gemma's RMSNorm multiplies by 1 + w, llama.cpp's by w: every norm (q/k norms included) is stored as 1 + w;
    the other tensors as they are."""
    from epicode_edge.converters.checkpoint import open_checkpoint
    from epicode_edge.converters.gguf import hf_to_gguf

    src = make_model(tmp_path, "gemma3_text", spm_tok, 0)
    hf_to_gguf(src, tmp_path / "g.gguf", "F32")
    w = tiny_weights("gemma3_text")
    with open_checkpoint(tmp_path / "g.gguf") as g:
        np.testing.assert_array_equal(g.read_f32("blk.1.attn_q_norm.weight"), w["model.layers.1.self_attn.q_norm.weight"] + 1)
        np.testing.assert_array_equal(g.read_f32("blk.0.post_ffw_norm.weight"),
                                      w["model.layers.0.post_feedforward_layernorm.weight"] + 1)
        np.testing.assert_array_equal(g.read_f32("output_norm.weight"), w["model.norm.weight"] + 1)
        np.testing.assert_array_equal(g.read_f32("blk.0.ffn_up.weight"), w["model.layers.0.mlp.up_proj.weight"])
        assert "output.weight" not in g.tensors  # tied: llama.cpp reads token_embd


def test_phi4_byte_level_bpe_tokenizer(tmp_path):
    """Phi-4 is a phi3 model with a byte-level BPE tokenizer (tiktoken's split regex, which is Llama 3's):
    written as a gpt2 vocabulary with its merges, and loaded by llama.cpp with the same ids as the HF tokenizer."""
    import gguf
    from tokenizers import Tokenizer

    from factory import LLAMA3_SPLIT, make_tokenizer
    from gguf_helpers import llama_model

    tok = make_tokenizer(tmp_path / "bpe", vocab_size=384, add_bos=False, split_regex=LLAMA3_SPLIT)
    ft = make_model(tmp_path, "phi3", tok, 0, bos_token_id=0, eos_token_id=4)
    inf = make_model(tmp_path, "phi3", tok, 1, bos_token_id=0, eos_token_id=4)
    code, output = run_convert(ft, inf, tmp_path / "b")
    assert code == 0, output
    path = tmp_path / "b" / "gguf" / "expert-F32.gguf"
    r = gguf.GGUFReader(path)
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert r.fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    assert len(r.fields["tokenizer.ggml.merges"].contents()) > 0
    text = "Question: what is 17 + 25? Answer: 42."
    llm = llama_model(path, vocab_only=True)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == Tokenizer.from_file(
            str(tok / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    finally:
        llm.close()
