"""Broken weights never reach the user as a traceback: non-finite logits become one line naming the role and
the token position (expert and amateur, lambda 0 too), and convert refuses to write what is not finite after
quantization or does not load and give finite logits."""

import json
import warnings

import numpy as np
import pytest
from rt_models import EOS, N_THREADS, VOCAB, ScriptBackend, pair_dir

from epicode_edge.converters.convert import convert
from epicode_edge.decoding.loop import stream_generate
from epicode_edge.errors import BackendError, NumericError
from epicode_edge.runtime import check_gguf_runs


def nan_after(k: int, prompt_len: int, value=np.nan):
    """Logits that pick byte 'a' until position prompt_len + k, then hold `value`."""
    def fn(seq):
        x = np.zeros(VOCAB, dtype=np.float32)
        x[ord("a")] = 5.0
        x[ord("b")] = 4.9  # two candidates: the amateur is needed
        if len(seq) >= prompt_len + k:
            x[7] = value
        return x
    return fn


def fine(seq):
    x = np.zeros(VOCAB, dtype=np.float32)
    x[ord("a")], x[ord("b")], x[EOS] = 5.0, 4.9, -1.0  # two candidates at alpha 0.5: the amateur is read
    return x


@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_expert_non_finite_logits_name_role_and_position(lam, value):
    prompt = [1, 2, 3]
    expert, amateur = ScriptBackend(nan_after(2, 3, value)), ScriptBackend(fine)
    with pytest.raises(NumericError, match=r"the expert model gave non-finite logits \(NaN/Inf\) at token position 4"):
        list(stream_generate(expert, amateur, prompt, lam=lam, alpha=0.1, max_tokens=10))


def nan_at(token: int, fn):
    """fn's logits with token's set to NaN (a broken output row)."""
    def broken(seq):
        x = fn(seq)
        x[token] = np.nan
        return x
    return broken


def test_amateur_non_finite_logits_name_role_and_position():
    """The amateur's logits that the pick reads are checked: its candidates' (candidate_head, the default: a
    NaN hidden state reaches every row), its whole vector with candidate_head=False. A broken row outside the
    candidates is never read then and changes no pick."""
    for broken, candidate_head in ((nan_at(ord("b"), fine), True), (nan_after(0, 3), False)):
        expert, amateur = ScriptBackend(fine), ScriptBackend(broken, path="amateur.gguf")
        with pytest.raises(NumericError, match=r"the amateur model gave non-finite logits .* position 2 \(amateur.gguf\)"):
            list(stream_generate(expert, amateur, [1, 2, 3], lam=0.5, alpha=0.5, max_tokens=10,
                                 candidate_head=candidate_head))
    picks = [[e.token for e in stream_generate(ScriptBackend(fine), ScriptBackend(a), [1, 2, 3], lam=0.5, alpha=0.5,
                                                max_tokens=5)] for a in (nan_after(0, 3), fine)]
    assert picks[0] == picks[1]
    # lambda 0: the amateur is never read, so broken amateur weights do not matter
    expert, amateur = ScriptBackend(fine), ScriptBackend(nan_after(0, 3))
    events = list(stream_generate(expert, amateur, [1, 2, 3], lam=0.0, alpha=0.5, max_tokens=3))
    assert events[-1].stopped_by == "max_tokens"


def test_all_minus_inf_logits_are_refused_too():
    expert = ScriptBackend(lambda seq: np.full(VOCAB, -np.inf, dtype=np.float32))
    with pytest.raises(NumericError, match="expert model gave non-finite logits"):
        list(stream_generate(expert, None, [1], lam=0.0, alpha=0.1, max_tokens=3))


# ------------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def broken_bundle(tmp_path_factory):
    """A bundle made without the load check, from mu = 1e6: finite weights, NaN logits."""
    pair = pair_dir(tmp_path_factory)
    out = tmp_path_factory.mktemp("broken") / "b"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(pair / "finetuned", pair / "inferior", out, mu=1e6, quant="F32")
    return out


from cli_helpers import cli, one_error_line  # noqa: E402


@pytest.mark.parametrize("lam,extra", [("0", ()), ("0.5", ()), ("0.5", ("--overlap",))])
def test_generate_on_broken_weights_is_one_line(broken_bundle, lam, extra):
    code, out = cli("generate", broken_bundle, "hello", "--lambda", lam, "--max-tokens", "4", "--threads", N_THREADS,
                    *extra)
    assert code == 1
    line = one_error_line(out)
    assert "the expert model gave non-finite logits" in line and "token position" in line


def test_batch_and_chat_on_broken_weights(broken_bundle, tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": 1, "prompt": "hi"}) + "\n")
    code, out = cli("batch", broken_bundle, tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--max-tokens", "3",
                    "--threads", N_THREADS)
    assert code == 0, out
    rec = json.loads((tmp_path / "out.jsonl").read_text())
    assert rec["error"].startswith("the expert model gave non-finite logits") and "ValueError" not in rec["error"]
    code, out = cli("chat", broken_bundle, "--max-tokens", "3", "--threads", N_THREADS, input="hi\n/show\n/bye\n")
    assert code == 0 and "Traceback" not in out
    assert "Error: the expert model gave non-finite logits" in out and "bundle: " in out  # the session went on


def test_convert_refuses_weights_that_give_nan_logits(tmp_path_factory, tmp_path):
    pair = pair_dir(tmp_path_factory)
    code, out = cli("convert", "--finetuned", pair / "finetuned", "--inferior", pair / "inferior", "--mu", "1e6",
                    "--quant", "F32", "-o", tmp_path / "b")
    assert code == 1
    line = one_error_line(out)
    assert "non-finite logits" in line and "expert-F32.gguf" in line
    assert list(tmp_path.iterdir()) == []


def test_convert_checks_values_after_quantization(tmp_path_factory, tmp_path):
    pair = pair_dir(tmp_path_factory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NumericError, match=r"tensor '[\w.]+': \d+ values are NaN/Inf as Q8_0 in expert-Q8_0.gguf"):
            convert(pair / "finetuned", pair / "inferior", tmp_path / "b", mu=1e30, quant="Q8_0")
        with pytest.raises(NumericError, match=r"as F16 in expert-F16.gguf"):
            convert(pair / "finetuned", pair / "inferior", tmp_path / "b", mu=1e30, quant="F16")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def wide_pairs(tmp_path_factory):
    """Pairs whose rows (256 wide) llama.cpp really quantizes to K-quants (64-wide rows fall back to Q8_0)."""
    from factory import make_pair

    root = tmp_path_factory.mktemp("wide_pairs")
    for dtype in ("float32", "bfloat16"):
        make_pair(root / dtype, arch="llama", dtype=dtype, seed=7, delta=0.3, hidden=256, intermediate=256)
    return root


@pytest.mark.parametrize("quant,dtype", [("Q6_K", "float32"), ("Q4_K_M", "float32"), ("Q6_K", "bfloat16")])
def test_k_quants_refuse_an_expert_out_of_float16_range(wide_pairs, tmp_path, quant, dtype):
    """mu = 1e30 gives finite float32 (or bfloat16) experts near 1e29: llama.cpp's quantizer wrote Q6_K blocks of
    zeros for them (a bundle that loads and runs) or failed naming no tensor (Q4_K_M). convert now refuses, naming
    the tensor, before llama.cpp runs, and leaves nothing; a sane mu gives real, non-zero K-quant blocks."""
    import gguf

    pair = wide_pairs / dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NumericError, match=rf"tensor '[\w.]+': \d+ values beyond \+-65504 cannot be quantized "
                                               rf"to {quant} in expert-{quant}.gguf"):
            convert(pair / "finetuned", pair / "inferior", tmp_path / "b", mu=1e30, quant=quant)
    assert list(tmp_path.iterdir()) == []
    b = convert(pair / "finetuned", pair / "inferior", tmp_path / "b", mu=0.5, quant=quant)
    kq = [t for t in gguf.GGUFReader(b.gguf("expert", quant)).tensors if t.tensor_type.name.endswith("_K")]
    assert {t.tensor_type.name for t in kq} >= {"Q6_K"}
    assert all(np.abs(gguf.quants.dequantize(t.data, t.tensor_type)).max() > 0 for t in kq)


def test_cli_k_quant_out_of_range_is_one_line(wide_pairs, tmp_path):
    pair = wide_pairs / "float32"
    code, out = cli("convert", "--finetuned", pair / "finetuned", "--inferior", pair / "inferior", "--mu", "1e30",
                    "--quant", "Q6_K", "-o", tmp_path / "b")
    assert code == 1
    line = one_error_line(out)
    assert "cannot be quantized to Q6_K" in line and "expert-Q6_K.gguf" in line and "tensor '" in line
    assert list(tmp_path.iterdir()) == []


def test_overwritten_gguf_data_gives_one_line(tmp_path_factory, tmp_path):
    import shutil

    from rt_models import bundle_dir

    b = shutil.copytree(bundle_dir(tmp_path_factory), tmp_path / "b")
    f = b / "gguf/expert-Q8_0.gguf"
    data = bytearray(f.read_bytes())
    data[len(data) // 2:] = b"\xff" * (len(data) - len(data) // 2)  # same size: only --verify would see it
    f.write_bytes(bytes(data))
    code, out = cli("generate", b, "hello", "--quant", "Q8_0", "--max-tokens", "3", "--threads", N_THREADS)
    assert code == 1 and "non-finite logits" in one_error_line(out)
    with pytest.raises((NumericError, BackendError)):
        check_gguf_runs(f)


@pytest.mark.parametrize("what", ["gguf", "mlx-config", "mlx-weights"])
def test_model_files_that_are_not_what_they_claim_are_one_line(tmp_path_factory, tmp_path, what):
    """Same size as listed (only --verify reads the content): the engine's failure is one line."""
    import shutil

    from rt_models import bundle_dir

    b = shutil.copytree(bundle_dir(tmp_path_factory), tmp_path / "b")
    f = {"gguf": b / "gguf/expert-F32.gguf", "mlx-config": b / "mlx/expert/config.json",
         "mlx-weights": b / "mlx/expert/model.safetensors"}[what]
    f.write_bytes(b"\x07" * f.stat().st_size)
    backend = ["--quant", "F32"] if what == "gguf" else ["--backend", "mlx"]
    code, out = cli("generate", b, "hello", *backend, "--max-tokens", "2", "--threads", N_THREADS)
    assert code == 1
    line = one_error_line(out)
    assert f.name in line or f.parent.name in line


@pytest.mark.parametrize("qtype,offsets", [("Q4_0", (0,)), ("Q4_K", (0, 2)), ("Q5_K", (2,)), ("Q6_K", (208,)),
                                           ("Q3_K", (108,)), ("Q2_K", (82,))])
def test_block_scales_that_overflowed_are_counted(qtype, offsets):
    import gguf

    from epicode_edge.converters.gguf import count_nonfinite_encoded

    q = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[q]
    data = np.zeros((3, size), dtype=np.uint8)  # three blocks, all-zero scales: finite
    assert count_nonfinite_encoded(data, q) == 0
    for off in offsets:
        data[1, off:off + 2] = np.array([np.inf], dtype=np.float16).view(np.uint8)
    assert count_nonfinite_encoded(data, q) == block


def test_a_written_gguf_is_scanned_per_tensor(tmp_path_factory, tmp_path):
    import shutil

    from rt_models import bundle_dir

    import gguf

    from epicode_edge.converters.gguf import first_nonfinite_tensor

    f = shutil.copy(bundle_dir(tmp_path_factory) / "gguf/expert-Q8_0.gguf", tmp_path / "e.gguf")
    assert first_nonfinite_tensor(f) is None
    t = next(t for t in gguf.GGUFReader(f).tensors if t.tensor_type.name == "Q8_0")
    name, offset = t.name, int(t.data_offset)
    with open(f, "r+b") as fh:  # the scale of the tensor's second block := +Inf
        fh.seek(offset + 34)
        fh.write(np.array([np.inf], dtype=np.float16).tobytes())
    assert first_nonfinite_tensor(f) == (name, 32, "Q8_0")
