"""LoRA adapters over one base: PEFT reading, GGUF LoRA files, merging, and the shared-base llama.cpp backend.

The oracle of the runtime adapters is the merged-weights model (W + s * alpha/r * B @ A) converted to GGUF F32
and run by llama.cpp's plain backend; the oracle of the expert context is convert's own extrapolation of the
merged finetuned and inferior checkpoints (expert = ft + mu * (ft - inf)). KV caches are F32 so that only
float error separates the two.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from epicode_edge.converters import lora
from epicode_edge.errors import BackendError, BundleError, EpicodeError, InputError, MismatchError, UnsupportedError
from factory import make_hf_model, make_lora_adapter, make_lora_pair

MU = 0.5
PROMPT = "Question: what is 17 + 25? Answer:"
TOL = 1e-4  # logits are O(10); F32 weights and KV cache leave ~1e-5


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def family(request, tmp_path_factory):
    """Base model, two adapters, the shared-base bundle and the merged-weights bundle (F32) of one arch."""
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    base = make_hf_model(root / "base", arch=request.param, seed=3)
    ft, inf = make_lora_pair(root / "adapters", base, rank=4, seed=5)
    shared = lora.convert_lora(base, ft, inf, root / "shared", mu=MU, quant="F32")
    merged = lora.convert_lora(base, ft, inf, root / "merged", mu=MU, quant="F32", merge=True, with_inferior=True)
    return {"arch": request.param, "root": root, "base": base, "ft": ft, "inf": inf,
            "shared": shared, "merged": merged}


def _plain(path):
    from epicode_edge.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend(path, n_ctx=128, n_threads=1, kv_type="f32")


def _roles(bundle, roles=("expert", "amateur", "inferior")):
    from epicode_edge.backends.llamacpp_lora import open_roles

    return open_roles(*lora.shared_base_roles(bundle, None), roles=roles, n_ctx=128, n_threads=1, kv_type="f32")


def _trace(backend, ids) -> list[np.ndarray]:
    """Logits after a prefill, three steps, and a step after truncation (the cache paths a chat uses)."""
    out = [backend.prefill(ids).copy()]
    for t in (5, 77, 100):
        out.append(backend.step(t).copy())
    backend.truncate(len(ids) - 2)
    out.append(backend.step(9).copy())
    return out


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------- reading

def test_read_adapter(family):
    a = lora.read_adapter(family["ft"])
    assert a.r == 4 and a.alpha == 8.0 and len(a.targets) == 2 * 7
    t = "model.layers.1.self_attn.k_proj.weight"
    A, B = a.read_ab(t)
    assert A.shape == (4, 64) and B.shape == (32, 4) and a.shape(t) == (32, 64)
    np.testing.assert_allclose(a.delta(t), 2.0 * B @ A, rtol=1e-6)


def test_lora_gguf_layout(family):
    """general.type adapter, adapter.type lora, alpha, <name>.lora_a (r, in) / .lora_b (out, r); q/k rows
    permuted for llama as the base export permutes W."""
    import gguf

    from epicode_edge.converters.gguf import permute_qk

    reader = gguf.GGUFReader(family["shared"].path / "lora" / "finetuned.gguf")
    f = {k: reader.fields[k] for k in ("general.type", "adapter.type", "adapter.lora.alpha", "general.architecture")}
    assert f["general.type"].contents() == "adapter" and f["adapter.type"].contents() == "lora"
    assert f["adapter.lora.alpha"].contents() == 8.0 and f["general.architecture"].contents() == family["arch"]
    t = {x.name: np.array(x.data) for x in reader.tensors}
    assert len(t) == 2 * 2 * 7
    A, B = lora.read_adapter(family["ft"]).read_ab("model.layers.0.self_attn.q_proj.weight")
    np.testing.assert_array_equal(t["blk.0.attn_q.weight.lora_a"], A)
    want_b = permute_qk(B, 4) if family["arch"] == "llama" else B
    np.testing.assert_array_equal(t["blk.0.attn_q.weight.lora_b"], want_b)
    if family["arch"] == "llama":
        assert not np.array_equal(want_b, B)


def test_shared_base_bundle_files(family):
    b = family["shared"]
    assert lora.is_shared_base(b) and not lora.is_shared_base(family["merged"])
    base, roles = lora.shared_base_roles(b)
    assert base.name == "base-F32.gguf" and base.is_file()
    ft_file, inf_file = b.path / "lora/finetuned.gguf", b.path / "lora/inferior.gguf"
    assert roles["expert"] == [(ft_file, 1.0 + MU), (inf_file, -MU)]
    assert roles["amateur"] == [(ft_file, 1.0)] and roles["inferior"] == [(inf_file, 1.0)]
    assert base.stat().st_size > 5 * ft_file.stat().st_size


# ---------------------------------------------------------------------------------------------- runtime

@pytest.mark.parametrize("scale", [1.0, 0.7, -1.3])
def test_runtime_adapter_matches_merged_weights(family, tmp_path, scale):
    """base + adapter x s at run time == GGUF of W + s * alpha/r * B @ A."""
    from epicode_edge.backends.llamacpp_lora import SharedBase
    from epicode_edge.converters.checkpoint import open_checkpoint
    from epicode_edge.converters.gguf import gguf_sink_for

    base = open_checkpoint(family["base"])
    merged = lora.MergedCheckpoint(base, [(lora.read_adapter(family["ft"]), scale)])
    with gguf_sink_for(merged, tmp_path / "m.gguf", "F32") as sink:
        for name in merged.tensors:
            sink.write(name, merged.read_f32(name))
    shared = SharedBase(family["shared"].gguf("base"), n_ctx=128, n_threads=1, kv_type="f32")
    role = shared.role([(family["shared"].path / "lora/finetuned.gguf", scale)])
    ref, plain_base = _plain(tmp_path / "m.gguf"), _plain(family["shared"].gguf("base"))
    try:
        ids = ref.tokenize(PROMPT)
        got, want = _trace(role, ids), _trace(ref, ids)
        assert _max_diff(got, want) < TOL
        assert _max_diff(got, _trace(plain_base, ids)) > 0.1  # the adapter does change the model
    finally:
        role.close(), ref.close(), plain_base.close()


def test_roles_match_merged_bundle(family):
    """expert (ft x (1+mu), inf x -mu) == convert's ft + mu*(ft - inf) of the merged checkpoints; amateur and
    inferior == the merged finetuned and inferior models."""
    roles = _roles(family["shared"])
    try:
        ids = roles["expert"].tokenize(PROMPT)
        traces = {}
        for role, backend in roles.items():
            ref = _plain(family["merged"].gguf(role))
            try:
                assert ref.tokenize(PROMPT) == ids
                traces[role] = _trace(backend, ids)
                assert _max_diff(traces[role], _trace(ref, ids)) < TOL, role
            finally:
                ref.close()
        assert _max_diff(traces["expert"], traces["amateur"]) > 0.1
    finally:
        for b in roles.values():
            b.close()


def test_merge_over_a_gguf_base_equals_the_hf_base(family, tmp_path):
    """merge=True with the base as a GGUF file (here the shared bundle's F32 export of the HF base): merged as
    the HF checkpoint that GGUF exports to (q/k rows and names back in HF's order), so the expert, amateur and
    inferior tensors equal the HF-base merge's bit for bit, and MLX/HF outputs are open to it; the view's
    temporary tokenizer folder is gone afterwards."""
    import gguf

    from epicode_edge.converters.checkpoint import open_checkpoint
    from epicode_edge.converters.gguf_to_hf import GGUFAsHF

    base_gguf = family["shared"].gguf("base")
    b = lora.convert_lora(base_gguf, family["ft"], family["inf"], tmp_path / "m", mu=MU, quant="F32", merge=True,
                          with_inferior=True, to=("gguf", "mlx"))
    for role in ("expert", "amateur", "inferior"):
        got = {t.name: np.array(t.data) for t in gguf.GGUFReader(b.gguf(role)).tensors}
        want = {t.name: np.array(t.data) for t in gguf.GGUFReader(family["merged"].gguf(role)).tensors}
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want), role
    assert (b.path / "mlx/expert/config.json").is_file()
    with open_checkpoint(base_gguf) as g:
        view = GGUFAsHF(g)
        hf = open_checkpoint(family["base"])
        assert set(view.tensors) == set(hf.tensors)
        name = "model.layers.0.self_attn.q_proj.weight"
        np.testing.assert_array_equal(view.read_f32(name), hf.read_f32(name))
        view.close()
        hf.close()
        assert not view.tokenizer_dir.exists()


def test_mu0_expert_is_amateur(family, tmp_path):
    b = lora.convert_lora(family["base"], family["ft"], family["inf"], tmp_path / "mu0", mu=0.0, quant="F32")
    assert lora.shared_base_roles(b)[1]["expert"] == lora.shared_base_roles(b)[1]["amateur"]
    roles = _roles(b, ("expert", "amateur"))
    try:
        ids = roles["expert"].tokenize(PROMPT)
        for x, y in zip(_trace(roles["expert"], ids), _trace(roles["amateur"], ids)):
            np.testing.assert_array_equal(x, y)
    finally:
        for r in roles.values():
            r.close()


def test_greedy_contrastive_equals_two_model_path(family):
    """The decoding loop, unchanged, on the shared-base roles gives the two-model bundle's greedy answer."""
    from epicode_edge.runtime import Runtime, load

    shared = family["shared"]
    roles = _roles(shared, ("expert", "amateur"))
    rt = Runtime(roles["expert"], roles["amateur"], lam=shared.lam, alpha=shared.alpha, bundle=shared)
    two = load(family["merged"].path, n_ctx=128, n_threads=1, kv_type="f32")
    try:
        for prompt in (PROMPT, "The quick brown fox"):
            got = rt.generate(prompt, raw=True, max_tokens=24, lam=1.0, alpha=0.05)
            want = two.generate(prompt, raw=True, max_tokens=24, lam=1.0, alpha=0.05)
            assert got.tokens == want.tokens and len(got.tokens) > 0
            assert got.changed_tokens == want.changed_tokens
    finally:
        rt.close(), two.close()


def test_batched_decoding_on_shared_base_equals_one_at_a_time(family):
    """Each role's multi-sequence form carries the role's adapters (it once decoded the bare base for both
    roles): batched greedy EpiCoDe answers equal one-at-a-time answers on a shared-base bundle."""
    from epicode_edge.apps.batch import generate_batch
    from epicode_edge.backends.llamacpp import LlamaCppBackend
    from epicode_edge.runtime import load

    rt = load(family["shared"].path, n_ctx=128, n_threads=1, kv_type="f32")
    bare = LlamaCppBackend(family["shared"].gguf("base"), n_ctx=128, n_threads=1, kv_type="f32")
    try:
        ids = rt.expert.tokenize(PROMPT)
        with rt.expert.multiseq(2) as e_ms, rt.amateur.multiseq(2) as a_ms:
            got_e, got_a = e_ms.decode([(1, ids)])[0], a_ms.decode([(0, ids)])[0]
        rt.expert.truncate(0), rt.amateur.truncate(0)
        np.testing.assert_allclose(got_e, rt.expert.prefill(ids), atol=1e-4)
        np.testing.assert_allclose(got_a, rt.amateur.prefill(ids), atol=1e-4)
        assert np.abs(got_e - bare.prefill(ids)).max() > 1e-2 and np.abs(got_e - got_a).max() > 1e-2
        prompts = [PROMPT, "The quick brown fox", "Once upon a time", "1 2 3"]
        kw = dict(max_tokens=16, lam=1.0, alpha=0.05)
        one = [rt.generate(p, **kw) for p in prompts]
        many = generate_batch(rt, prompts, parallel=3, **kw)
        assert [r.tokens for r in many] == [r.tokens for r in one]
        assert sum(r.changed_tokens for r in one) > 0  # contrastive decoding did change picks
    finally:
        rt.close(), bare.close()


def test_roles_other_than_expert_and_amateur_from_either_layout(family):
    """eval's CD-only row: the finetuned model against the inferior one, loaded by role from a shared-base bundle
    and from the merged two-model bundle alike (greedy contrastive answers agree)."""
    from epicode_edge.errors import ParameterError
    from epicode_edge.runtime import load

    shared = load(family["shared"].path, roles=("amateur", "inferior"), n_ctx=128, n_threads=1, kv_type="f32")
    merged = load(family["merged"].path, roles=("amateur", "inferior"), n_ctx=128, n_threads=1, kv_type="f32")
    try:
        got = shared.generate(PROMPT, raw=True, max_tokens=16, lam=1.0, alpha=0.05)
        want = merged.generate(PROMPT, raw=True, max_tokens=16, lam=1.0, alpha=0.05)
        assert got.tokens == want.tokens and len(got.tokens) > 0
        assert merged.expert.path.name.startswith("amateur") and merged.amateur.path.name.startswith("inferior")
    finally:
        shared.close(), merged.close()
    with pytest.raises(ParameterError, match="roles must be two role names"):
        load(family["shared"].path, roles=("expert",))
    # one role twice (the finetuned model alone, sampled): two contexts over one base, the same answers as the
    # merged bundle's two copies of the file, and lambda 0 equals the model's own greedy answer
    for bundle in (family["shared"], family["merged"]):
        with load(bundle.path, roles=("amateur", "amateur"), n_ctx=128, n_threads=1, kv_type="f32") as rt:
            assert rt.expert is not rt.amateur
            a = rt.generate(PROMPT, raw=True, max_tokens=12, lam=1.0)
            assert a.changed_tokens == 0 and a.tokens == rt.generate(PROMPT, raw=True, max_tokens=12, lam=0.0).tokens


def test_load_picks_shared_base_backend(family):
    """runtime.load() on a shared-base bundle gives the shared-base roles (needs the runtime hook)."""
    from epicode_edge.backends.llamacpp_lora import LoraRoleBackend
    from epicode_edge.runtime import load

    rt = load(family["shared"].path, n_ctx=64, n_threads=1)
    try:
        assert isinstance(rt.expert, LoraRoleBackend) and isinstance(rt.amateur, LoraRoleBackend)
        assert rt.expert._shared is rt.amateur._shared and rt.quant == "F32" and rt.mu == MU
    finally:
        rt.close()


# ---------------------------------------------------------------------------------------------- merging

def test_merged_checkpoint_keeps_dtype_and_untouched_tensors(tmp_path):
    from epicode_edge.converters.checkpoint import open_checkpoint
    from epicode_edge.converters.safetensors_io import bf16_to_f32, f32_to_bf16

    base_dir = make_hf_model(tmp_path / "base", dtype="bfloat16", seed=1)
    ft = lora.read_adapter(make_lora_adapter(tmp_path / "ft", base_dir, rank=2, seed=2))
    base = open_checkpoint(base_dir)
    m = lora.MergedCheckpoint(base, [(ft, 1.0)])
    name = "model.layers.0.mlp.down_proj.weight"
    want = f32_to_bf16(base.read_f32(name) + ft.delta(name))
    np.testing.assert_array_equal(m.read(name), want)
    np.testing.assert_array_equal(m.read_f32(name), bf16_to_f32(want))
    np.testing.assert_array_equal(m.read("model.norm.weight"), base.read("model.norm.weight"))
    assert lora.MergedCheckpoint(base, [(ft, 0.0)]).read(name).tobytes() == base.read(name).tobytes()


def test_rslora_and_alpha_pattern_fold_into_lora_b(tmp_path):
    """llama.cpp scales by alpha / r; other PEFT scales are folded into lora_b."""
    import gguf

    base_dir = make_hf_model(tmp_path / "base", seed=1)
    ad = make_lora_adapter(tmp_path / "ft", base_dir, rank=4, seed=2)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg.update(use_rslora=True, alpha_pattern={"down_proj": 2.0})
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    a = lora.read_adapter(ad)
    assert a.scales["model.layers.0.mlp.up_proj.weight"] == 8.0 / 2.0
    assert a.scales["model.layers.0.mlp.down_proj.weight"] == 2.0 / 2.0
    out = lora.write_lora_gguf(a, tmp_path / "a.gguf", json.loads((base_dir / "config.json").read_text()))
    t = {x.name: np.array(x.data) for x in gguf.GGUFReader(out).tensors}
    for target, gname in (("model.layers.0.mlp.up_proj.weight", "blk.0.ffn_up.weight"),
                          ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight")):
        lb, la = t[gname + ".lora_b"], t[gname + ".lora_a"]
        np.testing.assert_allclose(8.0 / 4 * lb @ la, a.delta(target), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- bad input

def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and msg
    return msg


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-bad")
    base = make_hf_model(root / "base", seed=1)
    other = make_hf_model(root / "other", seed=1, hidden=32, intermediate=64)
    ft, inf = make_lora_pair(root / "ok", base, rank=2, seed=1)
    return {"root": root, "base": base, "other": other, "ft": ft, "inf": inf}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case", ["no_folder", "no_config", "no_weights", "bin_only", "bad_json", "bad_r",
                                  "dora", "unpaired", "not_lora"])
def test_bad_adapter_one_line_errors(small, tmp_path, case):
    from epicode_edge.converters.safetensors_io import SafetensorsFile, to_f32, write_safetensors

    ad = _copy(small["ft"], tmp_path / "ad")
    cfg_path, w_path = ad / "adapter_config.json", ad / "adapter_model.safetensors"
    cfg = json.loads(cfg_path.read_text())
    want = {"no_folder": (InputError, "not a PEFT LoRA adapter folder"), "no_config": (InputError, "adapter_config.json"),
            "no_weights": (InputError, "missing adapter_model.safetensors"), "bin_only": (InputError, "safe_serialization"),
            "bad_json": (InputError, "cannot read adapter config"), "bad_r": (InputError, "'r'"),
            "dora": (UnsupportedError, "DoRA"), "unpaired": (EpicodeError, "no lora_B partner"),
            "not_lora": (UnsupportedError, "lm_head")}[case]
    if case == "no_folder":
        ad = tmp_path / "missing"
    elif case == "no_config":
        cfg_path.unlink()
    elif case in ("no_weights", "bin_only"):
        w_path.unlink()
        if case == "bin_only":
            (ad / "adapter_model.bin").write_bytes(b"x")
    elif case == "bad_json":
        cfg_path.write_text("{not json")
    elif case in ("bad_r", "dora"):
        cfg.update({"bad_r": {"r": 0}, "dora": {"use_dora": True}}[case])
        cfg_path.write_text(json.dumps(cfg))
    else:
        f = SafetensorsFile(w_path)
        t = {n: (np.array(to_f32(f.read(n), f.entries[n].dtype)), "F32") for n in f.entries}  # copies: the file is rewritten
        f.close()
        if case == "unpaired":
            t.pop("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight")
        else:
            t["base_model.model.lm_head.weight"] = (np.zeros((4, 4), np.float32), "F32")
        write_safetensors(w_path, t)
    out = tmp_path / "bundle"
    with pytest.raises(want[0]) as e:
        lora.convert_lora(small["base"], ad, small["inf"], out, mu=0.5, quant="F32")
    assert want[1] in _one_line(e.value)
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))


def test_adapter_for_another_base(small, tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(MismatchError) as e:
        lora.convert_lora(small["other"], small["ft"], small["inf"], out, mu=0.5, quant="F32")
    msg = _one_line(e.value)
    assert "finetuned" in msg and "model.layers.0" in msg and "another base" in msg
    assert not out.exists()


def test_adapters_naming_different_bases(small, tmp_path):
    inf = _copy(small["inf"], tmp_path / "inf")
    cfg = json.loads((inf / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/another-model"
    (inf / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MismatchError) as e:
        lora.convert_lora(small["base"], small["ft"], inf, tmp_path / "b", mu=0.5, quant="F32")
    assert "base_model_name_or_path differs" in _one_line(e.value)


def test_llama_cpp_refuses_adapter_of_other_arch(small, tmp_path):
    """An adapter GGUF llama.cpp cannot load is a BackendError (the NULL pointer never reaches a context)."""
    from epicode_edge.backends.llamacpp_lora import SharedBase

    qbase = make_hf_model(tmp_path / "qbase", arch="qwen2", seed=1)
    qad = lora.read_adapter(make_lora_adapter(tmp_path / "qad", qbase, rank=2, seed=1))
    qgguf = lora.write_lora_gguf(qad, tmp_path / "q.gguf", json.loads((qbase / "config.json").read_text()))
    b = lora.convert_lora(small["base"], small["ft"], small["inf"], tmp_path / "b", mu=0.5, quant="F32")
    shared = SharedBase(b.gguf("base"), n_ctx=32, n_threads=1)
    try:
        with pytest.raises(BackendError) as e:
            shared.role([(qgguf, 1.0)])
        assert "q.gguf" in _one_line(e.value)
        with pytest.raises(InputError):
            shared.role([(tmp_path / "absent.gguf", 1.0)])
    finally:
        shared.close()


def test_shared_base_bundle_is_gguf_only(small, tmp_path):
    with pytest.raises(UnsupportedError):
        lora.convert_lora(small["base"], small["ft"], small["inf"], tmp_path / "b", mu=0.5, to=("gguf", "mlx"))


def test_f16_adapters(family, tmp_path):
    """F16 adapter tensors (the default next to a quantized base): half the file, logits within F16 rounding."""
    b = lora.convert_lora(family["base"], family["ft"], family["inf"], tmp_path / "f16", mu=MU, quant="F32",
                          lora_type="F16")
    f16, f32 = b.path / "lora/finetuned.gguf", family["shared"].path / "lora/finetuned.gguf"
    assert f16.stat().st_size < 0.6 * f32.stat().st_size
    roles = _roles(b, ("expert",))
    ref = _plain(family["merged"].gguf("expert"))
    try:
        ids = ref.tokenize(PROMPT)
        d = _max_diff(_trace(roles["expert"], ids), _trace(ref, ids))
        assert TOL / 100 < d < 2e-2, d
    finally:
        roles["expert"].close(), ref.close()
    with pytest.raises(UnsupportedError):
        lora.convert_lora(family["base"], family["ft"], family["inf"], tmp_path / "x", mu=MU, quant="F32",
                          lora_type="Q4_0")
    assert not (tmp_path / "x").exists()


def test_nan_adapter_is_refused(small, tmp_path):
    from epicode_edge.converters.safetensors_io import SafetensorsFile, to_f32, write_safetensors
    from epicode_edge.errors import NumericError

    ad = _copy(small["inf"], tmp_path / "ad")
    w = ad / "adapter_model.safetensors"
    f = SafetensorsFile(w)
    t = {n: (np.array(to_f32(f.read(n), f.entries[n].dtype)), "F32") for n in f.entries}
    f.close()
    t["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"][0][1, 1] = np.nan
    write_safetensors(w, t)
    with pytest.raises(NumericError) as e:
        lora.convert_lora(small["base"], small["ft"], ad, tmp_path / "b", mu=0.5, quant="F32")
    assert "up_proj" in _one_line(e.value) and not (tmp_path / "b").exists()


def test_shared_base_amateur_at_another_quant(family, tmp_path):
    """load(amateur_quant=) on a shared-base bundle: the expert keeps the first base, the amateur gets the base at
    the other quant with the amateur's adapters: its logits are those of that quant's amateur role, not the expert's."""
    from epicode_edge.runtime import load

    b = lora.convert_lora(family["base"], family["ft"], family["inf"], tmp_path / "two", mu=MU, quant=["F32", "Q8_0"])
    with load(b.path, quant="F32", n_threads=1) as same, \
            load(b.path, quant="F32", amateur_quant="Q8_0", n_threads=1) as mixed, \
            load(b.path, quant="Q8_0", n_threads=1) as low:
        assert mixed.quant == "F32/Q8_0"
        ids = same.encode(PROMPT, raw=True)
        assert np.array_equal(mixed.expert.prefill(ids), same.expert.prefill(ids))
        y_mixed, y_low, y_same = (rt.amateur.prefill(ids).copy() for rt in (mixed, low, same))
        assert np.array_equal(y_mixed, y_low)
        assert 0 < np.abs(y_mixed - y_same).max() < 0.1 * np.abs(y_same).max()
    with pytest.raises(BundleError, match="Q4_0"):
        load(b.path, quant="F32", amateur_quant="Q4_0")


def test_fused_adapter_is_the_sum_of_the_adapters(family, tmp_path):
    """fuse_lora_gguf: one file applying several (adapter, scale) pairs, their alpha / r folded in (here a rank-4
    adapter with its own alpha beside a rank-2 one): the same logits as the adapters set one by one, and as
    the merged-weights expert."""
    from epicode_edge.backends.llamacpp_lora import SharedBase

    other = make_lora_adapter(tmp_path / "r2", family["base"], rank=2, seed=9, alpha=7.0)
    files = [family["shared"].path / "lora/finetuned.gguf",
             lora.write_lora_gguf(lora.read_adapter(other), tmp_path / "r2.gguf",
                                  json.loads((family["base"] / "config.json").read_text()))]
    pairs = [(files[0], 1 + MU), (files[1], -MU)]
    fused = lora.fuse_lora_gguf(pairs, tmp_path / "fused.gguf")
    shared = SharedBase(family["shared"].gguf("base"), n_ctx=128, n_threads=1, kv_type="f32")
    one_by_one, at_once = shared.role(pairs), shared.role([(fused, 1.0)])
    try:
        ids = one_by_one.tokenize(PROMPT)
        assert _max_diff(_trace(one_by_one, ids), _trace(at_once, ids)) < TOL
    finally:
        one_by_one.close(), at_once.close()
    roles = lora.fused_roles(lora.shared_base_roles(family["shared"])[1], tmp_path / "cache")
    expert = SharedBase(family["shared"].gguf("base"), n_ctx=128, n_threads=1, kv_type="f32").role(roles["expert"])
    ref = _plain(family["merged"].gguf("expert"))
    try:
        ids = ref.tokenize(PROMPT)
        assert _max_diff(_trace(expert, ids), _trace(ref, ids)) < TOL
    finally:
        expert.close(), ref.close()


def test_load_runs_the_expert_on_one_fused_adapter(family, tmp_path, monkeypatch):
    """load(): the expert's two adapters fused once into the cache (one adapter on its context, the amateur's
    one as it was) and reused by the next load; an unwritable cache keeps the two adapters, same answers."""
    from epicode_edge.runtime import load

    monkeypatch.setenv("EPICODE_EDGE_CACHE", str(tmp_path / "cache"))
    answers = []
    with load(family["shared"].path, n_ctx=128, n_threads=1, kv_type="f32") as rt:
        assert rt.expert.adapters == [1.0] and rt.amateur.adapters == [1.0]
        answers.append(rt.generate(PROMPT, raw=True, max_tokens=12).tokens)
    made = list((tmp_path / "cache/lora").glob("fused-*.gguf"))
    assert len(made) == 1
    stamp = made[0].stat().st_mtime_ns
    with load(family["shared"].path, n_ctx=128, n_threads=1, kv_type="f32") as rt:
        answers.append(rt.generate(PROMPT, raw=True, max_tokens=12).tokens)
    assert made[0].stat().st_mtime_ns == stamp
    for k in range(lora.FUSED_KEEP + 2):  # tune makes one per mu: the cache keeps the newest FUSED_KEEP
        lora.fused_roles({"expert": [(family["shared"].path / "lora/finetuned.gguf", 1.0 + k),
                                     (family["shared"].path / "lora/inferior.gguf", -k - 0.5)]}, tmp_path / "cache")
    assert len(list((tmp_path / "cache/lora").glob("fused-*.gguf"))) == lora.FUSED_KEEP
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("EPICODE_EDGE_CACHE", str(tmp_path / "file" / "cache"))  # under a file: cannot be made
    with load(family["shared"].path, n_ctx=128, n_threads=1, kv_type="f32") as rt:
        assert rt.expert.adapters == [1 + MU, -MU]
        answers.append(rt.generate(PROMPT, raw=True, max_tokens=12).tokens)
    assert answers[0] == answers[1] == answers[2] and len(answers[0]) > 0
