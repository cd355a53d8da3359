"""converters/convert.py and the `convert` CLI: one pass to every format; identities; bad inputs leave nothing."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from factory import make_pair

from epicode_edge.cli import main
from epicode_edge.converters.bundle import open_bundle
from epicode_edge.converters.checkpoint import open_checkpoint
from epicode_edge.converters.convert import Progress, convert, extrapolate
from epicode_edge.converters.extrapolate import ExtrapolationWarning
from epicode_edge.errors import BundleError, CheckpointError, MismatchError, NumericError, UnsupportedError


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert-pairs")
    return {
        "f32": make_pair(root / "f32", "llama", "float32", shards=1, seed=7, delta=0.1),
        "f32-sharded": make_pair(root / "f32-sharded", "llama", "float32", shards=3, seed=7, delta=0.1),
        "bf16": make_pair(root / "bf16", "qwen2", "bfloat16", shards=2, seed=8, delta=0.1),
        "f16": make_pair(root / "f16", "qwen3", "float16", shards=1, seed=9, delta=0.1),
    }


@pytest.fixture(scope="module")
def f32_bundle(pairs, tmp_path_factory):
    """gguf F32 + Q8_0 and hf, with the inferior: the bundle most tests look into."""
    out = tmp_path_factory.mktemp("bundles") / "f32"
    return convert(*pairs["f32"], out, mu=0.3, to=("gguf", "hf"), quant=("F32", "Q8_0"), with_inferior=True)


def gguf_tensors(path) -> dict[str, np.ndarray]:
    g = open_checkpoint(path)
    return {n: np.array(g.read_f32(n)) for n in g.tensors}


def hf_tensors(path) -> dict[str, np.ndarray]:
    c = open_checkpoint(path)
    return {n: np.array(c.read(n)) for n in c.tensors}


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape, n
        assert a[n].tobytes() == b[n].tobytes(), n


def leftovers(parent, keep=()):
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


# ---------------------------------------------------------------------------------------------- outputs


def test_bundle_layout_and_manifest(f32_bundle, pairs):
    b = f32_bundle
    assert b.formats == ["gguf", "hf"] and b.quants == ["F32", "Q8_0"]
    assert b.roles == ["expert", "amateur", "inferior"]
    m = b.manifest
    assert m["mu"] == 0.3 and m["defaults"] == {"lambda": 0.5, "alpha": 0.1} and m["arch"] == "llama"
    ft, inf = (open_checkpoint(p) for p in pairs["f32"])
    assert m["sources"]["finetuned"]["content_sha256"] == ft.content_hash()
    assert m["sources"]["inferior"]["content_sha256"] == inf.content_hash()
    assert m["tokenizer_hash"] == ft.tokenizer_hash()
    for q in ("F32", "Q8_0"):
        for role in ("expert", "amateur", "inferior"):
            assert b.gguf(role, q).name == f"{role}-{q}.gguf" and len(m["files"]["gguf"][q][role]["sha256"]) == 64
    s = b.summary
    assert s["tensors"] == len(ft.tensors) and s["input_bytes"] == ft.nbytes + inf.nbytes
    assert s["output_bytes"] > 0 and s["peak_rss_bytes"] > 0 and s["seconds"] > 0
    assert leftovers(b.path.parent) == ["f32"]
    assert not (b.path / ".work").exists()
    open_bundle(b.path, verify=True)


def test_hf_expert_is_the_formula(f32_bundle, pairs):
    ft, inf = (hf_tensors(p) for p in pairs["f32"])
    expert = hf_tensors(f32_bundle.hf("expert"))
    assert expert.keys() == ft.keys()
    for n in ft:
        np.testing.assert_array_equal(expert[n], ft[n] + np.float32(0.3) * (ft[n] - inf[n]), err_msg=n)
    cfg = json.loads((f32_bundle.hf() / "config.json").read_text())
    assert cfg == json.loads((pairs["f32"][0] / "config.json").read_text())
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (f32_bundle.hf() / f).read_bytes() == (pairs["f32"][0] / f).read_bytes()


def test_gguf_files_hold_the_right_models(f32_bundle, pairs, tmp_path):
    from epicode_edge.converters.gguf import hf_to_gguf

    cases = [("expert", f32_bundle.hf("expert")), ("amateur", pairs["f32"][0]), ("inferior", pairs["f32"][1])]
    for role, hf_dir in cases:
        ref = hf_to_gguf(hf_dir, tmp_path / f"{role}.gguf", "F32")
        assert_same_tensors(gguf_tensors(f32_bundle.gguf(role, "F32")), gguf_tensors(ref))
    q = gguf_tensors(f32_bundle.gguf("expert", "Q8_0"))
    f = gguf_tensors(f32_bundle.gguf("expert", "F32"))
    assert max(np.abs(q[n] - f[n]).max() for n in f) < 0.05


@pytest.mark.parametrize("kind", ["f32", "bf16", "f16"])
def test_mu_zero_gives_finetuned_bit_for_bit(pairs, tmp_path, kind):
    b = convert(*pairs[kind], tmp_path / "b", mu=0.0, to="hf,gguf", quant="F32")
    assert_same_tensors(hf_tensors(b.hf()), hf_tensors(pairs[kind][0]))
    assert b.gguf("expert").read_bytes() == b.gguf("amateur").read_bytes()


def test_sharded_and_single_inputs_give_identical_outputs(f32_bundle, pairs, tmp_path):
    b = convert(*pairs["f32-sharded"], tmp_path / "b", mu=0.3, to=("gguf", "hf"), quant=("F32", "Q8_0"))
    assert_same_tensors(hf_tensors(b.hf()), hf_tensors(f32_bundle.hf()))
    for q in ("F32", "Q8_0"):
        for role in ("expert", "amateur"):
            assert_same_tensors(gguf_tensors(b.gguf(role, q)), gguf_tensors(f32_bundle.gguf(role, q)))


def test_sharded_hf_output(pairs, tmp_path):
    b = convert(*pairs["bf16"], tmp_path / "b", mu=0.5, to="hf", max_shard_bytes=20_000)
    files = sorted(p.name for p in b.hf().glob("*.safetensors"))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert (b.hf() / "model.safetensors.index.json").is_file()
    single = extrapolate(*pairs["bf16"], tmp_path / "single", mu=0.5)
    assert [p.name for p in single.glob("*.safetensors")] == ["model.safetensors"]
    assert_same_tensors(hf_tensors(b.hf()), hf_tensors(single))


@pytest.mark.parametrize("source_quant", ["F32", "Q8_0"])
def test_gguf_inputs_give_the_same_expert_as_hf_inputs(f32_bundle, pairs, tmp_path, source_quant):
    from epicode_edge.converters.gguf import hf_to_gguf

    ft, inf = (hf_to_gguf(p, tmp_path / f"{p.name}.gguf", source_quant) for p in pairs["f32"])
    b = convert(ft, inf, tmp_path / "b", mu=0.3, to="gguf", quant="F32")
    got = gguf_tensors(b.gguf("expert"))
    want = gguf_tensors(f32_bundle.gguf("expert", "F32"))
    if source_quant == "F32":
        assert_same_tensors(got, want)
    else:  # the same formula on dequantized weights: close to the expert from the exact weights
        assert got.keys() == want.keys()
        assert max(np.abs(got[n] - want[n]).max() / (np.abs(want[n]).max() + 1e-6) for n in got) < 0.05


@pytest.mark.parametrize("source_quant", ["BF16", "Q4_0"])
def test_gguf_inputs_in_pieces_of_rows_give_the_whole_tensor_bytes(pairs, tmp_path, monkeypatch, source_quant):
    """GGUF -> GGUF streams pieces of rows: with pieces of 3 rows (most row counts not a multiple of 3), the
    files and the input hashes are byte for byte those of the whole-tensor path."""
    from epicode_edge.converters.gguf import hf_to_gguf
    from gguf_helpers import convert_in_pieces_and_whole

    ft, inf = (hf_to_gguf(p, tmp_path / f"{p.name}.gguf", source_quant) for p in pairs["f32"])
    pieces, whole = convert_in_pieces_and_whole(ft, inf, tmp_path, monkeypatch, mu=0.3, to="gguf",
                                                quant="Q8_0,F16,Q4_K_M", with_inferior=True)
    for q in ("Q8_0", "F16", "Q4_K_M"):
        for role in ("expert", "amateur", "inferior"):
            assert pieces.gguf(role, q).read_bytes() == whole.gguf(role, q).read_bytes(), (q, role)
    assert pieces.manifest["sources"] == whole.manifest["sources"]


def test_extrapolate_library_call_loads_in_mlx(f32_bundle, pairs, tmp_path):
    import mlx.core as mx
    from mlx_lm import load

    out = extrapolate(*pairs["f32"], tmp_path / "expert", mu=0.3, max_shard_bytes=50_000)
    assert (out / "model.safetensors.index.json").is_file() and leftovers(tmp_path) == ["expert"]
    assert_same_tensors(hf_tensors(out), hf_tensors(f32_bundle.hf()))
    model, tok = load(str(out))
    ids = tok.encode("The answer is 42.")
    logits = np.array(model(mx.array([ids]))[0, -1])  # (V,)
    assert logits.shape == (384,) and np.isfinite(logits).all()
    with pytest.raises(BundleError, match="already exists"):
        extrapolate(*pairs["f32"], out, mu=0.3)


def test_mlx_export(pairs, tmp_path):
    import mlx.core as mx
    from mlx_lm import load

    b = convert(*pairs["f32"], tmp_path / "b", mu=0.3, to="mlx,hf")
    assert b.formats == ["mlx", "hf"] and b.roles == ["expert", "amateur"]
    prompt = mx.array([[0, 17, 42, 99, 7]])

    def last_logits(path):
        model, _ = load(str(path))
        return np.array(model(prompt)[0, -1])  # (V,)

    np.testing.assert_allclose(last_logits(b.mlx("expert")), last_logits(b.hf("expert")), atol=1e-5)
    np.testing.assert_allclose(last_logits(b.mlx("amateur")), last_logits(pairs["f32"][0]), atol=1e-5)
    assert not np.allclose(last_logits(b.mlx("expert")), last_logits(b.mlx("amateur")), atol=1e-3)


def test_mistral_exports_to_mlx(tmp_path):
    """mlx_lm loads mistral through its llama module (MODEL_REMAPPING): convert must not refuse it."""
    ft, inf = make_pair(tmp_path / "pair", arch="llama")
    for d in (ft, inf):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(model_type="mistral", architectures=["MistralForCausalLM"])
        (d / "config.json").write_text(json.dumps(cfg))
    b = convert(ft, inf, tmp_path / "b", mu=0.2, to="mlx")
    assert b.formats == ["mlx"] and (b.mlx("expert") / "config.json").is_file()


def test_progress_reports_every_tensor(pairs, tmp_path):
    events: list[Progress] = []
    convert(*pairs["bf16"], tmp_path / "b", mu=0.3, quant="Q8_0,Q4_K_M", progress=events.append)
    passes = [e for e in events if e.stage == "extrapolate"]
    n = len(open_checkpoint(pairs["bf16"][0]).tensors)
    assert [e.tensors_done for e in passes] == list(range(1, n + 1))
    assert passes[-1].bytes_done == passes[-1].bytes_total
    assert {e.stage for e in events} == {"extrapolate", "finish", "hash"}


def test_warnings(pairs, tmp_path):
    with pytest.warns(ExtrapolationWarning, match="mu = 2.0 is large"):
        convert(*pairs["f32"], tmp_path / "a", mu=2.0, to="hf")
    ft = pairs["f32"][0]
    with pytest.warns(ExtrapolationWarning, match="same checkpoint"):
        convert(ft, ft, tmp_path / "b", mu=0.3, to="hf")
    copy = shutil.copytree(ft, tmp_path / "copy")
    with pytest.warns(ExtrapolationWarning, match="identical weights"):
        b = convert(ft, copy, tmp_path / "c", mu=0.3, to="hf")
    assert b.manifest["warnings"] == ["finetuned and inferior have identical weights: the expert equals finetuned"]


# ---------------------------------------------------------------------------------------------- bad inputs


def test_interrupted_convert_leaves_nothing(pairs, tmp_path):
    def interrupt(p):
        if p.tensors_done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(*pairs["bf16"], tmp_path / "b", mu=0.3, to="gguf,hf", quant="Q8_0,Q4_K_M", progress=interrupt)
    assert leftovers(tmp_path) == []

    def interrupt_quantizing(p):
        if p.stage == "finish" and p.tensors_done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(*pairs["bf16"], tmp_path / "b", mu=0.3, quant="Q8_0,Q4_K_M", progress=interrupt_quantizing)
    assert leftovers(tmp_path) == []


def test_interrupted_forced_convert_keeps_the_old_bundle(pairs, tmp_path):
    convert(*pairs["f32"], tmp_path / "b", mu=0.3, to="hf")

    def interrupt(p):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(*pairs["f32"], tmp_path / "b", mu=0.6, to="hf", force=True, progress=interrupt)
    assert open_bundle(tmp_path / "b", verify=True).mu == 0.3 and leftovers(tmp_path) == ["b"]
    assert convert(*pairs["f32"], tmp_path / "b", mu=0.6, to="hf", force=True).mu == 0.6
    assert leftovers(tmp_path) == ["b"]


@pytest.mark.filterwarnings("ignore::epicode_edge.converters.extrapolate.ExtrapolationWarning")
def test_nan_from_extrapolation_leaves_nothing(pairs, tmp_path):
    with pytest.raises(NumericError, match=r"tensor '[\w.]+': extrapolation with mu = 10000000.0 produced"):
        convert(*pairs["f16"], tmp_path / "b", mu=1e7, to="gguf,hf")
    assert leftovers(tmp_path) == []


@pytest.mark.filterwarnings("ignore::epicode_edge.converters.extrapolate.ExtrapolationWarning")
@pytest.mark.parametrize("source_quant", ["F16", "Q8_0"])
def test_gguf_overflow_in_pieces_is_the_whole_tensor_error(pairs, tmp_path, monkeypatch, source_quant):
    """The error raised in the read-ahead worker, mid-tensor, is the whole-tensor path's, and nothing is left."""
    import epicode_edge.converters.convert as cv
    from epicode_edge.converters.gguf import hf_to_gguf

    ft, inf = (hf_to_gguf(p, tmp_path / f"{p.name}.gguf", source_quant) for p in pairs["f16"])
    monkeypatch.setattr(cv, "PIECE_ELEMENTS", 64)
    monkeypatch.setattr(cv, "_cores", lambda: 2)
    mu = 1e7 if source_quant == "F16" else 1e38  # F16 overflows in the formula; float32 only in the encoder
    with pytest.raises(NumericError) as pieces:
        convert(ft, inf, tmp_path / "out" / "b", mu=mu, to="gguf", quant="F16")
    monkeypatch.setattr(cv._Sinks, "take_rows", lambda self: False)
    with pytest.raises(NumericError) as whole:
        convert(ft, inf, tmp_path / "out" / "b", mu=mu, to="gguf", quant="F16")
    assert str(pieces.value) == str(whole.value) and "NaN/Inf" in str(whole.value)
    assert leftovers(tmp_path / "out") == []


def _stored(path) -> dict[str, bytes]:
    g = open_checkpoint(path)
    return {n: np.asarray(g.read(n)).tobytes() for n in g.tensors}


@pytest.mark.filterwarnings("ignore::epicode_edge.converters.extrapolate.ExtrapolationWarning")
@pytest.mark.parametrize("quant", ["Q8_0", "F16"])
def test_gguf_rows_in_the_output_type_are_copied_as_stored(pairs, tmp_path, monkeypatch, quant):
    """GGUF inputs already in a quant written here (F32, F16, BF16, Q8_0; the others are finished by llama.cpp
    from float rows): the amateur's (and inferior's) tensors are the input's bytes, copied as llama-quantize
    copies a tensor already of the target type; at mu = 0 the expert's too. For files llama.cpp wrote,
    encoding them again gives the same bytes (its Q8_0 encoder is idempotent on its own blocks); a Q8_0 block
    another encoder wrote (here: its quants halved) is kept as it is, not re-encoded."""
    import gguf

    import epicode_edge.converters.convert as cv
    from epicode_edge.converters.gguf import GGUFCopySink, hf_to_gguf

    ft, inf = (hf_to_gguf(p, tmp_path / f"{p.name}.gguf", quant) for p in pairs["f32"])
    monkeypatch.setattr(cv, "PIECE_ELEMENTS", 3 * open_checkpoint(ft).tensors["token_embd.weight"].shape[-1])
    b = convert(ft, inf, tmp_path / "b", mu=0.3, to="gguf", quant=quant, with_inferior=True)
    assert _stored(b.gguf("amateur", quant)) == _stored(ft)
    assert _stored(b.gguf("inferior", quant)) == _stored(inf)
    assert _stored(b.gguf("expert", quant)) != _stored(ft)  # mu = 0.3: encoded
    zero = convert(ft, inf, tmp_path / "zero", mu=0, to="gguf", quant=quant)
    assert _stored(zero.gguf("expert", quant)) == _stored(ft)
    with monkeypatch.context() as m:
        m.setattr(GGUFCopySink, "stores_as", lambda self, name, stored_type: False)  # encode everything again
        again = convert(ft, inf, tmp_path / "again", mu=0.3, to="gguf", quant=quant)
    assert again.gguf("amateur", quant).read_bytes() == b.gguf("amateur", quant).read_bytes()
    assert _stored(again.gguf("expert", quant)) == _stored(b.gguf("expert", quant))
    if quant != "Q8_0":
        return
    t = next(t for t in gguf.GGUFReader(ft, "r+").tensors if t.name == "blk.0.attn_q.weight")
    block = t.data.reshape(-1)[:34]  # the first Q8_0 block: f16 scale, 32 int8 quants
    block[2:] = (block[2:].view(np.int8) // 2).view(np.uint8)
    odd = convert(ft, inf, tmp_path / "odd", mu=0.3, to="gguf", quant=quant)
    assert _stored(odd.gguf("amateur", quant)) == _stored(ft)  # the halved block as it is
    monkeypatch.setattr(GGUFCopySink, "stores_as", lambda self, name, stored_type: False)
    encoded = convert(ft, inf, tmp_path / "encoded", mu=0.3, to="gguf", quant=quant)
    assert _stored(encoded.gguf("amateur", quant))["blk.0.attn_q.weight"] != _stored(ft)["blk.0.attn_q.weight"]


@pytest.mark.filterwarnings("ignore::epicode_edge.converters.extrapolate.ExtrapolationWarning")
@pytest.mark.parametrize("quant", ["Q4_K_M", "Q4_0"])
def test_gguf_inputs_unchanged_are_requantized_by_llama_cpp(pairs, tmp_path, quant):
    """The amateur and inferior of GGUF inputs, at a quant llama.cpp makes, are llama-quantize's output for
    the input file (llama_model_quantize with requantizing allowed), byte for byte, with no float intermediate
    between: the expert at mu = 0 as well (the identity), while at mu > 0 the expert differs."""
    from epicode_edge.converters.gguf import QUANTS, hf_to_gguf, llama_quantize

    ft, inf = (hf_to_gguf(p, tmp_path / f"{p.name}.gguf", "Q8_0") for p in pairs["f32"])
    want = {}
    for name, src in (("ft", ft), ("inf", inf)):
        llama_quantize(src, tmp_path / f"{name}-{quant}.gguf", QUANTS[quant][0], allow_requantize=True)
        want[name] = (tmp_path / f"{name}-{quant}.gguf").read_bytes()
    b = convert(ft, inf, tmp_path / "b", mu=0.3, to="gguf", quant=quant, with_inferior=True)
    assert b.gguf("amateur", quant).read_bytes() == want["ft"]
    assert b.gguf("inferior", quant).read_bytes() == want["inf"]
    assert b.gguf("expert", quant).read_bytes() != want["ft"]
    zero = convert(ft, inf, tmp_path / "zero", mu=0, to="gguf", quant=quant)
    assert zero.gguf("expert", quant).read_bytes() == zero.gguf("amateur", quant).read_bytes() == want["ft"]
    assert leftovers(tmp_path / "b" / "gguf", keep=set(p.name for p in (tmp_path / "b" / "gguf").glob("*.gguf"))) == []


@pytest.mark.filterwarnings("ignore::epicode_edge.converters.extrapolate.ExtrapolationWarning")
@pytest.mark.parametrize("source", ["BF16", "Q8_0"])
def test_gguf_expert_encoded_to_llama_cpp_types_directly(tmp_path, monkeypatch, source):
    """GGUF inputs to a K-quant: the expert is encoded piece by piece to the per-tensor types llama.cpp chose
    for the requantized amateur, with no float intermediate for llama.cpp to quantize. From a BF16 pair that
    is the same tensors, types and bytes as the intermediate path (llama.cpp's quantizer on a BF16 file); from
    a quantized pair the values skip the intermediate's float16 rounding (same types, close values)."""
    import epicode_edge.converters.convert as cv
    import epicode_edge.converters.gguf as g

    pair = make_pair(tmp_path / "pair", arch="llama", dtype="bfloat16", seed=7, delta=0.3, hidden=256,
                     intermediate=256)  # 256-wide rows: real K-quant blocks
    ft, inf = (g.hf_to_gguf(p, tmp_path / f"{p.name}.gguf", source) for p in pair)
    monkeypatch.setattr(cv, "PIECE_ELEMENTS", 3 * 256)
    sources, quantize = [], g.llama_quantize
    monkeypatch.setattr(g, "llama_quantize", lambda src, *a, **kw: sources.append(src.name) or quantize(src, *a, **kw))
    direct = convert(ft, inf, tmp_path / "direct", mu=0.3, to="gguf", quant="Q4_K_M")
    assert sources == [ft.name]  # llama.cpp quantized the amateur from the input, nothing else
    monkeypatch.setattr(g.GGUFRequantizeSink, "types", lambda self: None)  # the expert through llama.cpp again
    old = convert(ft, inf, tmp_path / "old", mu=0.3, to="gguf", quant="Q4_K_M")
    assert sources[1:] == [ft.name, "expert-Q4_K_M.gguf.unquantized.part"]
    a, b = (open_checkpoint(x.gguf("expert", "Q4_K_M")) for x in (direct, old))
    assert {n: t.dtype for n, t in a.tensors.items()} == {n: t.dtype for n, t in b.tensors.items()}
    assert {t.dtype for t in a.tensors.values()} >= {"Q4_K", "Q6_K"}
    assert a.config["general.file_type"] == b.config["general.file_type"]
    for n in a.tensors:
        if source == "BF16":
            assert np.asarray(a.read(n)).tobytes() == np.asarray(b.read(n)).tobytes(), n
        else:
            x, y = a.read_f32(n), b.read_f32(n)
            assert np.abs(x - y).max() <= 0.1 * np.abs(y).max() + 1e-6, n


def test_read_ahead_hands_over_errors_and_stops_early():
    from epicode_edge.converters.convert import read_ahead

    def items(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise ValueError(f"item {i}")
            yield i

    assert list(read_ahead(items(50), 2)) == list(range(50))
    with pytest.raises(ValueError, match="item 7"):
        list(read_ahead(items(50, fail_at=7), 2))
    source = items(10**9)
    for i in read_ahead(source, 2):
        if i == 3:
            break
    with pytest.raises(StopIteration):  # the worker stopped and the source was closed
        next(source)


def test_encode_ahead_keeps_order_hands_over_errors_and_stops_early():
    import threading
    import time

    from epicode_edge.converters.convert import encode_ahead

    threads = set()

    def encode(i):  # later items finish first: the order must come from encode_ahead, not from the pool
        threads.add(threading.current_thread().name)
        time.sleep(0.002 * (i % 3 == 0))
        if i == 11:
            raise ValueError(f"item {i}")
        return i * i

    assert list(encode_ahead(iter(range(10)), encode, 3)) == [(i, i * i) for i in range(10)]
    assert len(threads) > 1 and threading.current_thread().name not in threads
    assert list(encode_ahead(iter(range(10)), encode, 1)) == [(i, i * i) for i in range(10)]
    got = []
    with pytest.raises(ValueError, match="item 11"):
        for i, _ in encode_ahead(iter(range(30)), encode, 3):
            got.append(i)
    assert got == list(range(11))  # every item before the failing one, in order
    started = []

    def slow(i):
        started.append(i)
        time.sleep(0.01)
        return i

    source = iter(range(10**6))
    for i, _ in encode_ahead(source, slow, 2):
        if i == 3:
            break
    assert len(started) <= 3 + 1 + 2  # items not yet started when the caller stopped were dropped
    assert next(source) <= 3 + 1 + 2 + 1


def test_bad_parameters_are_refused_before_reading(pairs, tmp_path):
    ft, inf = pairs["f32"]
    with pytest.raises(UnsupportedError, match="unknown quant type 'Q3_X'; supported: F32, F16"):
        convert(ft, inf, tmp_path / "b", mu=0.3, quant="Q8_0,Q3_X")
    with pytest.raises(UnsupportedError, match="unknown output format 'onnx'"):
        convert(ft, inf, tmp_path / "b", mu=0.3, to="gguf,onnx")
    with pytest.raises(Exception, match="mlx group_size|mlx_group_size"):
        convert(ft, inf, tmp_path / "b", mu=0.3, to="mlx", mlx_group_size=48)
    with pytest.raises(Exception, match="alpha must be in"):
        convert(ft, inf, tmp_path / "b", mu=0.3, alpha=0)
    assert leftovers(tmp_path) == []


def test_unsupported_architecture(pairs, tmp_path):
    ft, inf = (shutil.copytree(p, tmp_path / p.name) for p in pairs["f32"])
    for d in (ft, inf):
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    with pytest.raises(UnsupportedError, match="architecture 'gpt2' is not supported for GGUF; supported: llama"):
        convert(ft, inf, tmp_path / "b", mu=0.3)
    b = convert(ft, inf, tmp_path / "b", mu=0.3, to="hf")  # HF output needs no architecture support
    assert b.arch == "gpt2"


class TestCLI:
    def run(self, *args):
        r = CliRunner().invoke(main, ["convert", *map(str, args)])
        return r.exit_code, r.output

    def test_convert_and_info(self, pairs, tmp_path):
        ft, inf = pairs["bf16"]
        code, out = self.run("--finetuned", ft, "--inferior", inf, "--mu", "2", "--to", "gguf,hf", "--quant",
                             "q8_0,F16", "--with-inferior", "--lambda", "0.7", "--alpha", "0.2", "-o", tmp_path / "b")
        assert code == 0, out
        assert "Warning: mu = 2.0 is large" in out and "Wrote " in out and "peak memory" in out
        b = open_bundle(tmp_path / "b")
        assert (b.mu, b.lam, b.alpha, b.quants) == (2.0, 0.7, 0.2, ["Q8_0", "F16"])
        r = CliRunner().invoke(main, ["info", str(tmp_path / "b")])
        assert r.exit_code == 0 and "inferior" in r.output and "lambda = 0.7" in r.output

    @pytest.mark.parametrize("case", ["missing", "quant", "exists", "unwritable", "tokenizer", "arch", "other-model",
                                      "truncated", "gguf", "nan"])
    def test_bad_input(self, pairs, tmp_path, case):
        ft, inf = pairs["f32"]
        out = tmp_path / "out" / "b"
        out.parent.mkdir()
        args = {"--finetuned": ft, "--inferior": inf, "--mu": 0.3, "-o": out}
        expect = ""
        if case == "missing":
            args["--inferior"], expect = tmp_path / "nope", "nope: no such file or directory"
        elif case == "quant":
            args["--quant"], expect = "Q8_0,Q4_K_S", "unknown quant type 'Q4_K_S'"
        elif case == "exists":
            out.mkdir()
            (out / "keep").write_text("x")
            expect = "already exists (use --force to replace it)"
        elif case == "unwritable":
            (tmp_path / "file").write_text("x")
            args["-o"], expect = tmp_path / "file" / "b", "cannot be written"
        elif case in ("tokenizer", "arch", "truncated"):
            args["--inferior"] = inf = shutil.copytree(inf, tmp_path / "inf")
            if case == "tokenizer":
                (inf / "tokenizer_config.json").write_text("{}")
                expect = "tokenizers differ"
            elif case == "arch":
                cfg = json.loads((inf / "config.json").read_text())
                (inf / "config.json").write_text(json.dumps(dict(cfg, model_type="qwen2")))
                expect = "architecture differs"
            else:
                f = inf / "model.safetensors"
                f.write_bytes(f.read_bytes()[:-10])
                expect = "model.safetensors: truncated: tensor"
        elif case == "other-model":
            args["--inferior"], expect = pairs["bf16"][1], "architecture differs"
        elif case == "gguf":
            bad = tmp_path / "bad.gguf"
            bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
            args["--finetuned"] = args["--inferior"] = bad
            expect = "bad.gguf: corrupted or truncated GGUF"
        elif case == "nan":
            args.update({"--finetuned": pairs["f16"][0], "--inferior": pairs["f16"][1], "--mu": 1e7})
            expect = "NaN/Inf"
        code, output = self.run(*[x for kv in args.items() for x in kv])
        assert code == 1, output
        assert expect in output and output.count("Error: ") == 1
        error_line = next(line for line in output.splitlines() if line.startswith("Error: "))
        assert expect in error_line
        assert leftovers(out.parent) == (["b"] if case == "exists" else [])
        if case == "exists":
            assert leftovers(out) == ["keep"]

    def test_ctrl_c_exits_130_and_leaves_nothing(self, pairs, tmp_path, monkeypatch):
        from epicode_edge import cli

        calls = []

        def update(self, p):
            calls.append(p)
            if len(calls) == 4:
                raise KeyboardInterrupt

        monkeypatch.setattr(cli, "_convert_progress", update)
        ft, inf = pairs["f32"]
        code, output = self.run("--finetuned", ft, "--inferior", inf, "--mu", "0.3", "--to", "gguf,hf", "-o",
                                tmp_path / "b")
        assert code == 130 and "Interrupted" in output
        assert len(calls) == 4 and leftovers(tmp_path) == []

    def test_force(self, pairs, tmp_path):
        ft, inf = pairs["f32"]
        base = ["--finetuned", ft, "--inferior", inf, "--to", "hf", "-o", tmp_path / "b"]
        assert self.run(*base, "--mu", "0.1")[0] == 0
        assert self.run(*base, "--mu", "0.2")[0] == 1
        assert self.run(*base, "--mu", "0.2", "--force")[0] == 0
        assert open_bundle(tmp_path / "b").mu == 0.2 and leftovers(tmp_path) == ["b"]


def test_library_errors_are_typed(pairs, tmp_path):
    with pytest.raises(CheckpointError):
        convert(tmp_path / "nope", pairs["f32"][1], tmp_path / "b", mu=0.3)
    with pytest.raises(MismatchError):
        convert(pairs["f32"][0], pairs["f16"][1], tmp_path / "b", mu=0.3)
    assert leftovers(tmp_path) == []
