"""The SmolLM2 recipe's output rule: OUT is written only after the premise gate passes (or with --force),
never over the shipped family by default; --full selects the paper's regime. Training itself is replaced by
a stand-in that writes what training writes (this checks the file handling, not the training)."""

import json
from pathlib import Path

import pytest

from family_modules import FAMILY, load_family_script


def _load(name):
    return load_family_script(name, "_out")


recipe = _load("recipe")


def fake_train(gate):
    def train(cfg, out, log_only, say, cache):
        for role in ("inferior", "finetuned"):
            (out / role).mkdir()
            (out / role / "adapter_model.safetensors").write_bytes(b"new " + role.encode())
        log = {"gate": gate, "config": cfg}
        (out / "train_log.json").write_text(json.dumps(log))
        return log
    return train


PASSED, FAILED = {"passed": True}, {"passed": False}


@pytest.mark.parametrize("gate,force,written", [(PASSED, False, True), (FAILED, False, False), (None, False, False),
                                                (FAILED, True, True)])
def test_out_is_written_only_after_the_gate_or_with_force(tmp_path, monkeypatch, gate, force, written):
    monkeypatch.setattr(recipe, "_train", fake_train(gate))
    out = tmp_path / "fam"
    (out / "finetuned").mkdir(parents=True)
    (out / "finetuned" / "adapter_model.safetensors").write_bytes(b"shipped")
    log = recipe.run(dict(recipe.CONFIG), out, say=lambda s: None, force=force)
    assert log["written"] is written
    got = (out / "finetuned" / "adapter_model.safetensors").read_bytes()
    assert got == (b"new finetuned" if written else b"shipped")
    failed = tmp_path / "fam.gate-failed"
    assert failed.is_dir() is (not written)
    if not written:
        assert (failed / "finetuned" / "adapter_model.safetensors").read_bytes() == b"new finetuned"
        assert json.loads((failed / "train_log.json").read_text())["gate"] == gate
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["fam"] + ["fam.gate-failed"] * (not written))


def test_a_failure_in_training_leaves_nothing(tmp_path, monkeypatch):
    def boom(cfg, out, log_only, say, cache):
        (out / "finetuned").mkdir()
        raise RuntimeError("killed")

    monkeypatch.setattr(recipe, "_train", boom)
    with pytest.raises(RuntimeError):
        recipe.run(dict(recipe.CONFIG), tmp_path / "fam", say=lambda s: None)
    assert not list(tmp_path.iterdir())


def test_defaults_never_target_the_shipped_family_and_full_is_the_papers_regime(monkeypatch):
    seen = {}

    def run(cfg, out, log_only=False, say=print, cache=None, force=False):
        seen.update(cfg=cfg, out=out, force=force)
        return {"gate": {"passed": True}}

    monkeypatch.setattr(recipe, "run", run)
    recipe.main([])
    assert seen["out"] == Path("runs") / "smollm2" and seen["out"].resolve() != FAMILY
    assert seen["cfg"]["lr"] == 5e-4 and seen["cfg"]["full"] == 0 and not seen["force"]
    recipe.main(["--full", "--force"])
    assert seen["cfg"]["full"] == 1 and seen["cfg"]["lr"] == 3e-5 and seen["force"]
    assert tuple(seen["cfg"]["betas"]) == (0.9, 0.95)
    recipe.main(["--full", "--lr", "1e-5"])
    assert seen["cfg"]["lr"] == 1e-5
