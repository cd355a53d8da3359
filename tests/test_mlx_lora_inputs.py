"""mlx_lm.lora adapters (LoRA, DoRA) as inputs: the numbered adapter files of one mlx_lm run over one base.

The adapters are made by mlx_lm's own tuner code (linear_to_lora_layers on the mlx_lm model of a tiny HF
checkpoint, trainable parameters moved off their initial values, saved as mlx_lm's trainer saves them). The
oracle is mlx_lm's own fuse (LoRALinear.fuse / DoRALinear.fuse) of the same adapter files:
  amateur = fuse(W, ft);  LoRA expert = fuse(fuse(W, ft at (1 + mu) * scale), inf at -mu * scale)
  DoRA expert = (1 + mu) * fuse(W, ft) - mu * fuse(W, inf)   (DoRA's rescaled rows are not linear in the adapter:
  the expert is the per-tensor extrapolation of the two fused weights)
and the shared-base bundle's llama.cpp logits are checked against the merged bundle's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import assert_one_line_error, cli
from epicode_edge.converters import lora, mlx_lora
from epicode_edge.converters.checkpoint import open_checkpoint
from factory import make_hf_model
from mlx_adapters import SCALE, make_mlx_run, mlx_fuse

MU = 0.5
PROMPT = "Question: what is 17 + 25? Answer:"
TOL = 1e-4  # llama.cpp logits, F32 weights and KV cache


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("mlx-lora") / "base", arch="llama", seed=3)


def _run(kind, base, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"mlx-{kind}") / "adapters"
    files = make_mlx_run(folder, base, kind=kind, seed=7)
    return {"kind": kind, "folder": folder, "ft": files[200], "inf": files[100]}


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    return _run("lora", base, tmp_path_factory)


@pytest.fixture(scope="module")
def dora_run(base, tmp_path_factory):
    return _run("dora", base, tmp_path_factory)


@pytest.fixture(scope="module", params=["lora", "dora"])
def run(request):
    return request.getfixturevalue(f"{request.param}_run")


def _targets(adapter_file) -> list[str]:
    a = mlx_lora.read_mlx_adapter(adapter_file)
    try:
        return sorted(a.targets)
    finally:
        a.close()


def test_read_mlx_adapter(run, base):
    a = mlx_lora.read_mlx_adapter(run["ft"])
    try:
        assert a.kind == run["kind"] and a.r == 4 and a.scale == SCALE and a.alpha == 4 * SCALE
        assert len(a.targets) == 2 * 7 and a.base_model == str(base)
        t = "model.layers.1.self_attn.k_proj.weight"
        assert a.shape(t) == (32, 64)
        A, B = a.read_ab(t)
        assert A.shape == (4, 64) and B.shape == (32, 4)
    finally:
        a.close()
    folder = mlx_lora.read_mlx_adapter(run["folder"])  # the folder: its adapters.safetensors (the last step)
    assert folder.path.name == "adapters.safetensors"
    folder.close()


def test_merged_equals_mlx_lm_fuse(run, base):
    """Each adapter merged into the base (the amateur's and the inferior's weights) == mlx_lm's fuse."""
    cfg = run["folder"] / "adapter_config.json"
    ckpt = open_checkpoint(base)
    for which in ("ft", "inf"):
        want = mlx_fuse(base, cfg, [(run[which], None)])
        adapter = mlx_lora.read_mlx_adapter(run[which])
        merged = lora.merge_adapter(ckpt, adapter)
        changed = 0
        for name in ckpt.tensors:
            got = merged.read_f32(name)
            np.testing.assert_allclose(got, want[name], rtol=1e-5, atol=1e-6, err_msg=name)
            changed += not np.array_equal(got, ckpt.read_f32(name))
        assert changed == len(adapter.targets)  # every adapted weight moved, nothing else
        adapter.close()


@pytest.fixture(scope="module")
def merged_bundle(run, base, tmp_path_factory):
    """--merge to every output format (F32 GGUF with the inferior model, MLX, HF)."""
    out = tmp_path_factory.mktemp(f"merged-{run['kind']}") / "bundle"
    return lora.convert_lora(base, run["ft"], run["inf"], out, mu=MU, quant="F32", merge=True, to="gguf,mlx,hf",
                             with_inferior=True)


def test_merged_expert_equals_mlx_lm_fuse_at_the_expert_scales(run, base, merged_bundle):
    cfg = run["folder"] / "adapter_config.json"
    if run["kind"] == "lora":  # W + (1 + mu) dFT - mu dINF, fused by mlx_lm at those scales
        want = mlx_fuse(base, cfg, [(run["ft"], (1 + MU) * SCALE), (run["inf"], -MU * SCALE)])
    else:  # (1 + mu) W'_ft - mu W'_inf of mlx_lm's two DoRA fuses
        ft, inf = mlx_fuse(base, cfg, [(run["ft"], None)]), mlx_fuse(base, cfg, [(run["inf"], None)])
        want = {n: (1 + MU) * ft[n] - MU * inf[n] for n in ft}
    amateur = mlx_fuse(base, cfg, [(run["ft"], None)])
    expert = open_checkpoint(merged_bundle.path / "hf/expert")
    for name in expert.tensors:
        np.testing.assert_allclose(expert.read_f32(name), want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    moved = max(float(np.abs(expert.read_f32(n) - amateur[n]).max()) for n in expert.tensors)
    assert moved > 1e-3  # the expert is not the amateur
    # the MLX folders: the expert's and the amateur's weights
    import mlx.core as mx

    for role, ref in (("expert", want), ("amateur", amateur)):
        got = {}
        for f in sorted((merged_bundle.path / "mlx" / role).glob("*.safetensors")):
            got.update({k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(f)).items()})
        for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
            np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=f"{role} {name}")
    src = merged_bundle.manifest["sources"]
    assert src["finetuned"]["path"] == str(run["ft"].absolute())


def _plain(path):
    from epicode_edge.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend(path, n_ctx=128, n_threads=1, kv_type="f32")


def test_shared_base_logits_equal_merged_bundle(run, base, merged_bundle, tmp_path):
    """LoRA: the shared-base bundle (base GGUF + two GGUF LoRA files at the role scales) gives the merged bundle's
    logits for expert, amateur and inferior on llama.cpp. DoRA: refused in one line."""
    if run["kind"] == "dora":
        code, out = cli("convert", "--base", base, "--finetuned", run["ft"], "--inferior", run["inf"], "--mu", MU,
                        "--quant", "F32", "-o", tmp_path / "b")
        assert_one_line_error(code, out, "DoRA", "--merge")
        assert not (tmp_path / "b").exists()
        return
    from epicode_edge.backends.llamacpp_lora import open_roles

    shared = lora.convert_lora(base, run["ft"], run["inf"], tmp_path / "shared", mu=MU, quant="F32")
    assert shared.manifest["sources"]["finetuned"]["format"] == "mlx-lora"
    roles = open_roles(*lora.shared_base_roles(shared, None), roles=("expert", "amateur", "inferior"), n_ctx=128,
                       n_threads=1, kv_type="f32")
    try:
        ids = roles["expert"].tokenize(PROMPT)
        got = {}
        for role, backend in roles.items():
            ref = _plain(merged_bundle.gguf(role))
            try:
                got[role] = backend.prefill(ids).copy()
                want = ref.prefill(ids)
                assert float(np.abs(got[role] - want).max()) < TOL, role
            finally:
                ref.close()
        assert float(np.abs(got["expert"] - got["amateur"]).max()) > 0.05
    finally:
        for b in roles.values():
            b.close()


def test_cli_base_implied_by_the_adapter_config(lora_run, base, tmp_path):
    """Without --base the base is the adapter_config's "model" (a local folder here)."""
    run = lora_run
    code, out = cli("convert", "--finetuned", run["ft"], "--inferior", run["inf"], "--mu", MU, "--quant", "F32",
                    "-o", tmp_path / "b")
    assert code == 0, out
    assert f"base model {base}" in out
    m = json.loads((tmp_path / "b" / "epicode.json").read_text())
    assert m["layout"] == "shared-base" and m["sources"]["base"]["path"] == str(base.absolute())


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def odd(base, tmp_path_factory):
    """Adapters that do not go with the `lora` run: rank 8, fewer layers, another base."""
    root = tmp_path_factory.mktemp("mlx-odd")
    other = make_hf_model(root / "other", arch="llama", seed=4, hidden=48)
    return {"rank8": make_mlx_run(root / "rank8", base, rank=8, seed=1)[100],
            "one_layer": make_mlx_run(root / "one", base, num_layers=1, seed=2)[100],
            "other_base": make_mlx_run(root / "other-run", other, seed=3),
            "root": root}


@pytest.mark.parametrize("case, expect", [
    ("rank8", ["rank differs", "rank 4", "rank 8"]),
    ("one_layer", ["adapted layers differ", "model.layers.0."]),
    ("other_base", ["0000200_adapters.safetensors", "tensor 'model.layers.", "another base model"]),
])
def test_bad_pair_one_line(lora_run, base, odd, tmp_path, case, expect):
    run = lora_run
    ft, inf = (odd[case][200], odd[case][100]) if case == "other_base" else (run["ft"], odd[case])
    code, out = cli("convert", "--base", base, "--finetuned", ft, "--inferior", inf, "--mu", MU,
                    "--quant", "F32", "-o", tmp_path / "b")
    assert_one_line_error(code, out, *expect)
    assert not (tmp_path / "b").exists()


def test_bad_config_one_line(base, tmp_path):
    files = make_mlx_run(tmp_path / "a", base, steps=(1, 2), num_layers=1, seed=5)
    cfg = tmp_path / "a" / "adapter_config.json"
    data = json.loads(cfg.read_text())
    for change, expect in ((("lora_parameters", {"rank": 4, "alpha": 16}), "scale"),
                           (("fine_tune_type", "full"), "is an adapter parameter, but the config's fine_tune_type "
                                                        "is full"),
                           (("lora_parameters", {"rank": 8, "scale": 2.0}), "rank 4")):
        cfg.write_text(json.dumps({**data, change[0]: change[1]}))
        code, out = cli("convert", "--base", base, "--finetuned", files[2], "--inferior", files[1], "--mu", MU,
                        "-o", tmp_path / "b")
        assert_one_line_error(code, out, expect)


# ------------------------------------------------------------------------------ mlx_lm full finetuning


@pytest.fixture(scope="module")
def full_run(base, tmp_path_factory):
    """mlx_lm.lora --fine-tune-type full: the last 2 layers' own weights (all of this base's), saved at steps 100
    and 200."""
    return _run("full", base, tmp_path_factory)


def test_full_run_merged_equals_mlx_lm_load_adapters(full_run, base):
    """Each saved step over the base == mlx_lm's own load_adapters of it (the weights in place of the base's)."""
    cfg = full_run["folder"] / "adapter_config.json"
    ckpt = open_checkpoint(base)
    for which in ("ft", "inf"):
        want = mlx_fuse(base, cfg, [(full_run[which], None)])
        adapter = mlx_lora.read_mlx_adapter(full_run[which])
        assert (adapter.kind, adapter.format) == ("full", "mlx-full")
        # the two layers' weights (num_layers 2 of 2), not the embeddings or the final norm
        assert sorted(adapter.targets) == sorted(n for n in ckpt.tensors if n.startswith("model.layers."))
        merged = lora.merge_adapter(ckpt, adapter)
        changed = 0
        for name in ckpt.tensors:
            got = merged.read_f32(name)
            np.testing.assert_array_equal(got, want[name], err_msg=name)  # F32 weights: the same numbers
            changed += not np.array_equal(got, ckpt.read_f32(name))
        assert changed == len(adapter.targets)  # every trained weight moved, nothing else
        adapter.close()


def test_full_run_converts_merged_from_its_folder(full_run, base, tmp_path):
    """`convert --run FOLDER --merge`: the last step finetuned, the first inferior; the expert is the per-tensor
    extrapolation of the two weight sets; without --merge one line says to merge."""
    cfg = full_run["folder"] / "adapter_config.json"
    code, out = cli("convert", "--run", full_run["folder"], "--mu", MU, "--merge", "--quant", "F32", "--to",
                    "gguf,hf", "-o", tmp_path / "b")
    assert code == 0, out
    assert "mlx_lm full-finetuning weights" in out
    ft, inf = mlx_fuse(base, cfg, [(full_run["ft"], None)]), mlx_fuse(base, cfg, [(full_run["inf"], None)])
    expert = open_checkpoint(tmp_path / "b" / "hf" / "expert")
    for name in expert.tensors:
        np.testing.assert_allclose(expert.read_f32(name), (1 + MU) * ft[name] - MU * inf[name], rtol=1e-6,
                                   atol=1e-6, err_msg=name)
    assert max(float(np.abs(expert.read_f32(n) - ft[n]).max()) for n in expert.tensors) > 1e-3
    code, out = cli("convert", "--base", base, "--finetuned", full_run["ft"], "--inferior", full_run["inf"],
                    "--mu", MU, "--quant", "F32", "-o", tmp_path / "c")
    assert_one_line_error(code, out, "full finetuning saves layer weights, not adapters", "--merge")
    assert not (tmp_path / "c").exists()


def test_full_run_of_another_base_is_one_line(full_run, base, odd, tmp_path):
    other = make_mlx_run(odd["root"] / "other-full", odd["root"] / "other", kind="full", seed=6)
    code, out = cli("convert", "--base", base, "--finetuned", other[200], "--inferior", other[100], "--mu", MU,
                    "--merge", "--quant", "F32", "-o", tmp_path / "b")
    assert_one_line_error(code, out, "0000200_adapters.safetensors", "tensor 'model.", "another base model")
    assert not (tmp_path / "b").exists()
