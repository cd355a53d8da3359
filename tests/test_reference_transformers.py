"""An independent reference: transformers' own forward pass, and llama.cpp's own converter.

For every architecture the tool writes from HF checkpoints, two tiny random checkpoints are made with
transformers' own classes (finetuned, and inferior = finetuned perturbed), converted by the tool to GGUF F32
and MLX float32, and the expert's last-token logits from llama.cpp (F32 KV cache) and from mlx_lm are compared
with transformers' forward of the expert extrapolated in torch. The weights are scaled so that what each
architecture's layout rules change shows in the logits: Gemma's norm offsets, soft-capping (at values other
than llama.cpp's defaults), sliding window (shorter than the prompt), local and global rope bases; Phi-3's
fused projections and longrope factors.

llama.cpp's convert_hf_to_gguf.py is a second reference for the GGUF layout: with EPICODE_LLAMA_CPP_SRC set to
a llama.cpp source tree (vendor/llama.cpp of the llama-cpp-python sdist:
`pip download --no-deps --no-binary :all: llama-cpp-python==<version>`), its file for the same checkpoint must
hold the same architecture keys, tensors (names, shapes, types, values) and vocabulary as ours.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from factory import make_spm_tokenizer  # noqa: E402
from gguf_helpers import llama_last_logits, llama_model, mlx_last_logits, mlx_load_f32  # noqa: E402

import epicode_edge  # noqa: E402

MU = 0.5
IDS = [1, 17, 42, 99, 7, 256, 3, 64, 200, 11, 150, 5, 77, 31]  # longer than the sliding windows below
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=None)
ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "phi3")


def hf_config(arch: str, vocab: int):
    """A transformers config of `arch`, tiny, with each layout rule made visible in the logits."""
    T = transformers
    c = dict(COMMON, vocab_size=vocab)
    if arch == "llama":
        return T.LlamaConfig(**c, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if arch == "qwen2":
        return T.Qwen2Config(**c, rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    if arch == "qwen3":
        return T.Qwen3Config(**c, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    if arch == "gemma2":  # soft-caps below llama.cpp's defaults (50, 30); layer 0 sliding (window 4), layer 1 global
        return T.Gemma2Config(**c, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                              attn_logit_softcapping=3.0, final_logit_softcapping=5.0,
                              rope_parameters={"rope_type": "default", "rope_theta": 100.0})
    if arch == "gemma3_text":  # one sliding layer, one global, rope bases other than llama.cpp's defaults
        return T.Gemma3TextConfig(**c, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                                  layer_types=["sliding_attention", "full_attention"],
                                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 30.0},
                                                   "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}})
    if arch == "gemma3":  # the multimodal model (Gemma 3 4B and larger): the text model above beside a vision
        # tower and projector, which the tool leaves out (converters/multimodal.py)
        vision = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=28, patch_size=14)
        return T.Gemma3Config(text_config=hf_config("gemma3_text", vocab), vision_config=vision,
                              mm_tokens_per_image=4, image_token_index=vocab - 1, boi_token_index=vocab - 3,
                              eoi_token_index=vocab - 2)
    if arch == "phi3":  # longrope, prompt past original_max_position_embeddings: long factors and attn_factor
        return T.Phi3Config(**c, original_max_position_embeddings=8, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.5 * i for i in range(8)], "long_factor": [3.0 + 0.5 * i for i in range(8)]})
    raise ValueError(arch)


def randomize(model, seed: int, offset_norms: bool) -> None:
    """Weights of a size that gives spread-out logits (transformers' init gives near-uniform ones); norm
    weights around 0 where the model adds 1 (Gemma), else around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((0.0 if offset_norms else 1.0) + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / p.shape[-1] ** 0.5))


def make_pair(root: Path, arch: str) -> tuple[Path, Path]:
    tok = make_spm_tokenizer(root / "tok")  # one llama.cpp's converter reads for every architecture here
    cfg = hf_config(arch, 512)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    randomize(model, seed=1, offset_norms=arch.startswith("gemma"))
    dirs = []
    for name, noise in (("ft", 0.0), ("inf", 0.05)):
        if noise:
            g = torch.Generator().manual_seed(2)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(noise * p.abs().mean() * torch.randn(p.shape, generator=g))
        out = root / name
        model.save_pretrained(out, safe_serialization=True)
        for f in tok.iterdir():
            (out / f.name).write_bytes(f.read_bytes())
        dirs.append(out)
    return dirs[0], dirs[1]


def torch_expert_logits(ft: Path, inf: Path, ids: list[int]) -> np.ndarray:
    """transformers' forward of expert = ft + mu * (ft - inf), extrapolated in torch: (V,) last position."""
    a = transformers.AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32)
    b = transformers.AutoModelForCausalLM.from_pretrained(inf, dtype=torch.float32)
    inf_params = dict(b.named_parameters())
    with torch.no_grad():
        for name, p in a.named_parameters():
            p.add_(MU * (p - inf_params[name]))
        a.eval()
        return a(torch.tensor([ids])).logits[0, -1].float().numpy()


# mlx_lm's gemma2 attends to every position in every layer (no sliding window): the same as transformers
# only for prompts within the window.
MLX_IDS = {"gemma2": IDS[:4]}
# llama.cpp's CPU GELU rounds its input to float16 (GGML_GELU_FP16): ~1e-4 relative on these logits
GGUF_RTOL = {"gemma2": 1e-3, "gemma3_text": 1e-3, "gemma3": 1e-3}


@pytest.fixture(scope="module", params=ARCHS)
def converted(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(f"ref-{arch}")
    ft, inf = make_pair(root, arch)
    bundle = epicode_edge.convert(ft, inf, root / "bundle", mu=MU, to=["gguf", "mlx"], quant=["F32"])
    return arch, ft, inf, Path(bundle.path)


def assert_close(ours: np.ndarray, ref: np.ndarray, what: str, rtol: float = 1e-4) -> None:
    scale = float(np.abs(ref).max())
    assert scale > 1.0, f"{what}: reference logits too flat to test anything ({scale})"
    err = float(np.abs(ours - ref).max())
    assert err <= rtol * scale, f"{what}: max |diff| {err:.3g} vs transformers (logits up to {scale:.3g})"


def test_llama_cpp_expert_matches_transformers(converted):
    arch, ft, inf, bundle = converted
    llm = llama_model(bundle / "gguf" / "expert-F32.gguf", n_ctx=128)
    try:
        assert_close(llama_last_logits(llm, IDS), torch_expert_logits(ft, inf, IDS), f"{arch} GGUF F32 in llama.cpp",
                     GGUF_RTOL.get(arch, 1e-4))
    finally:
        llm.close()


def test_mlx_expert_matches_transformers(converted):
    pytest.importorskip("mlx_lm")
    arch, ft, inf, bundle = converted
    ids = MLX_IDS.get(arch, IDS)
    model, _ = mlx_load_f32(bundle / "mlx" / "expert")
    assert_close(mlx_last_logits(model, ids), torch_expert_logits(ft, inf, ids), f"{arch} MLX float32")


# ------------------------------------------------------------------------ llama.cpp's own converter

def _llama_cpp_converter() -> Path | None:
    src = os.environ.get("EPICODE_LLAMA_CPP_SRC")
    if not src:
        return None
    for p in (Path(src) / "convert_hf_to_gguf.py", Path(src) / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"):
        if p.is_file():
            return p
    return None


def _gguf_fields(path: Path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> (shape, type, float32 values)) of a GGUF file."""
    import gguf

    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (tuple(int(d) for d in t.shape), t.tensor_type.name, np.array(t.data, dtype=np.float32))
               for t in r.tensors}
    return meta, tensors


def test_gguf_layout_matches_llama_cpp_converter(converted, tmp_path):
    script = _llama_cpp_converter()
    if script is None:
        pytest.skip("EPICODE_LLAMA_CPP_SRC does not point at a llama.cpp tree with convert_hf_to_gguf.py "
                    "(vendor/llama.cpp of the llama-cpp-python sdist)")
    arch, ft, _, _ = converted
    ref_path, ours_path = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    run = subprocess.run([sys.executable, str(script), str(ft), "--outtype", "f32", "--outfile", str(ref_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    from epicode_edge.converters.gguf import hf_to_gguf

    hf_to_gguf(ft, ours_path, "F32")
    ref_meta, ref_tensors = _gguf_fields(ref_path)
    ours_meta, ours_tensors = _gguf_fields(ours_path)
    gguf_arch = ref_meta["general.architecture"]
    assert ours_meta["general.architecture"] == gguf_arch
    for key, value in ref_meta.items():  # every architecture key llama.cpp's converter writes, same value
        if key.startswith(f"{gguf_arch}."):
            assert key in ours_meta, f"{arch}: {key} missing"
            assert ours_meta[key] == pytest.approx(value), f"{arch}: {key} = {ours_meta[key]} != {value}"
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id"):
        assert ours_meta.get(key) == ref_meta.get(key), f"{arch}: {key} differs"
    space = "tokenizer.ggml.add_space_prefix"  # absent: llama.cpp's default for SentencePiece, True
    assert ours_meta.get(space, True) == ref_meta.get(space, True), f"{arch}: {space} differs"
    # Types and scores of added tokens are left out: ours follow the HF tokenizer's added_tokens
    # (tokenizer.json), which the converter reads for phi3 only (<|eot_id|> user-defined here, normal there).
    added = {a["id"] for a in json.loads((ft / "tokenizer.json").read_text())["added_tokens"]}
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        ours_v, ref_v = ours_meta[key], ref_meta[key]
        assert len(ours_v) == len(ref_v)
        differ = [i for i, (a, b) in enumerate(zip(ours_v, ref_v)) if a != b and i not in added]
        assert not differ, f"{arch}: {key} differs at ids {differ[:5]}"
    assert sorted(ours_tensors) == sorted(ref_tensors)
    for name, (shape, qtype, values) in ref_tensors.items():
        o_shape, o_type, o_values = ours_tensors[name]
        assert (o_shape, o_type) == (shape, qtype), f"{arch}: tensor {name}"
        np.testing.assert_array_equal(o_values, values, err_msg=f"{arch}: tensor {name}")
