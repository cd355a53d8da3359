"""converters/extrapolate.py: the formula (exact, one rounding), mu = 0 identity, pair validation, NaN/Inf."""

import json
import shutil

import numpy as np
import pytest
from factory import make_pair

from epicode_edge.converters.checkpoint import open_checkpoint
from epicode_edge.converters.extrapolate import (
    CHUNK,
    count_nonfinite,
    extrapolate_tensor,
    iter_expert,
    validate_pair,
)
from epicode_edge.converters.safetensors_io import f32_to_bf16, from_f32, to_f32
from epicode_edge.errors import MismatchError, NumericError, ParameterError

TAGS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return {dtype: make_pair(root / dtype, "llama", dtype, shards=2, seed=5, delta=0.1) for dtype in TAGS}


def formula_numpy(ft32: np.ndarray, inf32: np.ndarray, mu: float) -> np.ndarray:
    """The paper's formula, computed independently: float32 throughout, mu as float32."""
    return ft32 + np.float32(mu) * (ft32 - inf32)


def round_to(x32: np.ndarray, tag: str) -> np.ndarray:
    """One rounding of float32 to tag, written independently of safetensors_io (bf16: RNE on bits)."""
    if tag == "F32":
        return x32
    if tag == "F16":
        return x32.astype(np.float16).astype(np.float32)
    u = x32.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("dtype", list(TAGS))
def test_mu_zero_is_bit_identical(pairs, dtype):
    ft, inf = (open_checkpoint(p) for p in pairs[dtype])
    n = 0
    for t in iter_expert(ft, inf, 0.0):
        assert t.expert.dtype == ft.read(t.name).dtype
        assert t.expert.tobytes() == ft.read(t.name).tobytes()
        n += 1
    assert n == len(ft.tensors)


@pytest.mark.parametrize("dtype", list(TAGS))
@pytest.mark.parametrize("mu", [0.3, 1.0])
def test_every_tensor_equals_the_formula(pairs, dtype, mu):
    tag = TAGS[dtype]
    ft, inf = (open_checkpoint(p) for p in pairs[dtype])
    for t in iter_expert(ft, inf, mu):
        assert t.tag == tag
        want = round_to(formula_numpy(ft.read_f32(t.name), inf.read_f32(t.name), mu), tag)
        got = to_f32(t.expert, tag)
        np.testing.assert_array_equal(got, want, err_msg=t.name)
        assert not np.array_equal(got, ft.read_f32(t.name))  # it did move


def test_chunked_formula_on_a_big_tensor():
    rng = np.random.default_rng(0)
    ft = rng.standard_normal((3, CHUNK + 5)).astype(np.float32)  # several chunks, the last one short
    inf = ft + 0.01 * rng.standard_normal(ft.shape).astype(np.float32)
    for tag in TAGS.values():
        a, b = from_f32(ft, tag), from_f32(inf, tag)
        got = to_f32(extrapolate_tensor(a, b, 0.7, tag), tag)
        np.testing.assert_array_equal(got, round_to(formula_numpy(to_f32(a, tag), to_f32(b, tag), 0.7), tag))


def test_bf16_rounding_is_nearest_even():
    x = np.array([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8)], np.float32)  # exact ties
    assert to_f32(f32_to_bf16(x), "BF16").tolist() == [1.0, 1.0 + 2**-6, -1.0]


def test_tied_embeddings_stay_tied(tmp_path):
    ft, inf = (open_checkpoint(p) for p in make_pair(tmp_path, "qwen3", tie=True))
    names = [t.name for t in iter_expert(ft, inf, 0.5)]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert ft.config["tie_word_embeddings"] is True


# ---------------------------------------------------------------------------------------------- validation


def test_valid_pair_has_no_warnings(pairs):
    ft, inf = (open_checkpoint(p) for p in pairs["float32"])
    assert validate_pair(ft, inf, 0.3) == []


def test_mu_checks(pairs):
    ft, inf = (open_checkpoint(p) for p in pairs["float32"])
    with pytest.raises(ParameterError, match="mu must be a finite number >= 0"):
        validate_pair(ft, inf, -0.1)
    with pytest.raises(ParameterError, match="mu must be a finite number >= 0"):
        validate_pair(ft, inf, float("nan"))
    with pytest.raises(ParameterError, match="mu must be a number"):
        validate_pair(ft, inf, "a lot")
    assert any("mu = 1.5 is large" in w for w in validate_pair(ft, inf, 1.5))
    assert any("same checkpoint" in w for w in validate_pair(ft, ft, 0.3))


def _copy(src, dst):
    return shutil.copytree(src, dst)


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_mismatched_architecture(pairs, tmp_path):
    ft = open_checkpoint(pairs["float32"][0])
    inf = _copy(pairs["float32"][1], tmp_path / "inf")
    _edit_config(inf, model_type="mistral")
    with pytest.raises(MismatchError, match="architecture differs: .* 'llama', .* 'mistral'"):
        validate_pair(ft, open_checkpoint(inf), 0.3)


def test_mismatched_config_field(pairs, tmp_path):
    ft = open_checkpoint(pairs["float32"][0])
    inf = _copy(pairs["float32"][1], tmp_path / "inf")
    _edit_config(inf, rope_theta=500000.0, transformers_version="9.9", _name_or_path="elsewhere")
    with pytest.raises(MismatchError, match="config.json field 'rope_theta' differs: 10000.0 in finetuned"):
        validate_pair(ft, open_checkpoint(inf), 0.3)
    _edit_config(inf, rope_theta=10000.0)  # the noise fields alone are accepted
    assert validate_pair(ft, open_checkpoint(inf), 0.3) == []


def test_mismatched_shapes_dtypes_and_tensor_sets(pairs, tmp_path):
    ft = open_checkpoint(pairs["float32"][0])
    wrong_dtype = open_checkpoint(pairs["float16"][1])
    with pytest.raises(MismatchError, match="config.json field 'torch_dtype' differs"):
        validate_pair(ft, wrong_dtype, 0.3)
    inf = _copy(pairs["float16"][1], tmp_path / "inf16")
    _edit_config(inf, torch_dtype="float32")  # a config that lies about the dtype: the tensors tell
    with pytest.raises(MismatchError, match="tensor 'model.embed_tokens.weight': dtype F32 in finetuned, F16"):
        validate_pair(ft, open_checkpoint(inf), 0.3)
    other = make_pair(tmp_path / "wide", "llama", "float32", intermediate=96)[1]
    with pytest.raises(MismatchError, match="config.json field 'intermediate_size' differs"):
        validate_pair(ft, open_checkpoint(other), 0.3)
    _edit_config(other, intermediate_size=128)
    with pytest.raises(MismatchError, match=r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight': shape \(128, 64\) in finetuned, \(96, 64\)"):
        validate_pair(ft, open_checkpoint(other), 0.3)
    qwen = make_pair(tmp_path / "tied", "llama", "float32", tie=True)[1]
    _edit_config(qwen, tie_word_embeddings=False)
    with pytest.raises(MismatchError, match="tensor 'lm_head.weight' is in finetuned but not in inferior"):
        validate_pair(ft, open_checkpoint(qwen), 0.3)


def test_different_tokenizers(pairs, tmp_path):
    ft = open_checkpoint(pairs["float32"][0])
    inf = _copy(pairs["float32"][1], tmp_path / "inf")
    tok = json.loads((inf / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<|bos|>"
    (inf / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(MismatchError, match=r"tokenizers differ .* \(tokenizer.json\)"):
        validate_pair(ft, open_checkpoint(inf), 0.3)


def test_hf_and_gguf_inputs_cannot_be_mixed(pairs, tmp_path):
    from epicode_edge.converters.gguf import hf_to_gguf

    g = hf_to_gguf(pairs["float32"][1], tmp_path / "inf.gguf", "F32")
    with pytest.raises(MismatchError, match="is an HF folder but inferior .* is a GGUF file"):
        validate_pair(open_checkpoint(pairs["float32"][0]), open_checkpoint(g), 0.3)


# ---------------------------------------------------------------------------------------------- NaN / Inf


def test_overflow_in_f16_is_reported_with_the_tensor(pairs):
    ft, inf = (open_checkpoint(p) for p in pairs["float16"])
    with pytest.raises(NumericError, match=r"tensor '[\w.]+': extrapolation with mu = 10000000.0 produced \d+ NaN/Inf"):
        for _ in iter_expert(ft, inf, 1e7):
            pass


def test_nan_in_an_input_is_blamed_on_it(pairs, tmp_path):
    from epicode_edge.converters.safetensors_io import SafetensorsFile, write_safetensors

    inf = _copy(pairs["bfloat16"][1], tmp_path / "inf")
    shard = inf / "model-00002-of-00002.safetensors"
    st = SafetensorsFile(shard)
    tensors = {n: (np.array(st.read(n)), e.dtype) for n, e in st.entries.items()}
    name = next(iter(tensors))
    tensors[name][0].reshape(-1)[3] = 0x7FC0  # bf16 NaN
    del st
    write_safetensors(shard, tensors, {"format": "pt"})
    ft = open_checkpoint(pairs["bfloat16"][0])
    with pytest.raises(NumericError, match=f"tensor '{name}': the inferior checkpoint holds 1 NaN/Inf"):
        for _ in iter_expert(ft, open_checkpoint(inf), 0.3):
            pass


def test_count_nonfinite():
    x = np.array([1.0, np.inf, -np.inf, np.nan, 0.0], np.float32)
    assert count_nonfinite(x, "F32") == 3
    assert count_nonfinite(x.astype(np.float16), "F16") == 3
    assert count_nonfinite(f32_to_bf16(x), "BF16") == 3


def test_pieces_of_rows_hold_the_whole_tensors_values():
    """iter_expert_rows: pieces of any size (1 value up to more than a tensor) concatenate to iter_expert's
    tensors, for 0-D, 1-D, 2-D, 3-D and empty tensors."""
    from epicode_edge.converters.checkpoint import Checkpoint, TensorInfo
    from epicode_edge.converters.extrapolate import iter_expert_rows

    class Arrays(Checkpoint):
        def __init__(self, arrays):
            self.arrays, self.config = arrays, {}
            self.tensors = {n: TensorInfo(n, "F32", a.shape, a.nbytes) for n, a in arrays.items()}

        def read(self, name):
            return self.arrays[name]

    rng = np.random.default_rng(0)
    ft = {"empty": np.zeros((5, 0), np.float32), "scalar": np.float32(3).reshape(()),
          "vector": rng.standard_normal(7).astype(np.float32), "matrix": rng.standard_normal((10, 4)).astype(np.float32),
          "cube": rng.standard_normal((3, 4, 8)).astype(np.float32)}
    inf = {n: a * np.float32(0.5) for n, a in ft.items()}
    whole = {t.name: t.expert for t in iter_expert(Arrays(ft), Arrays(inf), 0.3)}
    for n, a in ft.items():
        assert whole[n].shape == a.shape and np.array_equal(whole[n], a + np.float32(0.3) * (a - inf[n])), n
    for chunk in (1, 3, 8, 17, 1000):
        pieces: dict = {}
        for p in iter_expert_rows(Arrays(ft), Arrays(inf), 0.3, chunk_elements=chunk):
            assert p.start == sum(len(x) for x in pieces.get(p.name, [])), (p.name, chunk)
            pieces.setdefault(p.name, []).append(p.expert)
        for n, a in ft.items():
            assert np.array_equal(np.concatenate(pieces[n]).reshape(a.shape), whole[n]), (n, chunk)
