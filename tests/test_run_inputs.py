"""A training run's output folder as input (convert --run, tune --run): HF Trainer-style checkpoint-N/ folders
(full weights or PEFT adapters, trainer_state.json written here as the Trainer writes it) and mlx_lm's numbered
adapter files; which checkpoint becomes finetuned and inferior, and why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, cli
from epicode_edge.converters.runs import read_run
from epicode_edge.errors import InputError
from factory import make_hf_model, make_lora_adapter

STEPS_PER_EPOCH = 50


def _state(step: int, losses: dict[int, float]) -> dict:
    """trainer_state.json of a checkpoint at `step`, as transformers' Trainer writes it."""
    return {"global_step": step, "epoch": step / STEPS_PER_EPOCH, "max_steps": 2 * STEPS_PER_EPOCH,
            "num_train_epochs": 2, "log_history": [{"epoch": s / STEPS_PER_EPOCH, "loss": l, "step": s}
                                                   for s, l in sorted(losses.items()) if s <= step]}


LOSSES = {10: 2.5, 20: 2.1, 25: 1.9, 40: 1.5, 50: 1.4, 75: 1.1, 90: 0.95, 100: 0.9}


def make_trainer_run(root: Path, steps=(25, 50, 75, 100), kind: str = "full", base: Path | None = None,
                     states: bool = True) -> Path:
    """root/checkpoint-N per step: tiny full checkpoints (each its own weights) or PEFT adapters over `base`."""
    root.mkdir(parents=True)
    prev = None
    for i, step in enumerate(steps):
        d = root / f"checkpoint-{step}"
        if kind == "full":
            make_hf_model(d, arch="llama", seed=10 + i, tokenizer_dir=_tok(root))
        else:
            prev = make_lora_adapter(d, base, rank=4, seed=20 + i, like=prev)
        if states:
            (d / "trainer_state.json").write_text(json.dumps(_state(step, LOSSES)))
    return root


def _tok(root: Path) -> Path:
    from factory import make_tokenizer

    tok = root.parent / "tokenizer"
    return tok if tok.is_dir() else make_tokenizer(tok)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return make_trainer_run(tmp_path_factory.mktemp("run-full") / "out")


def test_pick_end_of_epoch_one_of_two(full_run):
    run = read_run(full_run)
    assert [(c.step, c.epoch, c.kind) for c in run.checkpoints] == [
        (25, 0.5, "full"), (50, 1.0, "full"), (75, 1.5, "full"), (100, 2.0, "full")]
    assert [c.loss for c in run.checkpoints] == [1.9, 1.4, 1.1, 0.9]  # the last loss logged at or before each
    pick = run.pick()
    assert pick.finetuned == full_run / "checkpoint-100" and pick.inferior == full_run / "checkpoint-50"
    assert "end of epoch 1 of 2" in pick.reason and pick.base is None
    lines = pick.lines()
    assert any(line.split()[:4] == ["50", "1.00", "1.4000", "checkpoint-50"] and line.endswith("<- inferior")
               for line in lines), lines
    assert any(line.endswith("checkpoint-100   <- finetuned") for line in lines), lines


def test_pick_middle_without_epoch_boundary_or_epochs(tmp_path):
    # epochs recorded, but no checkpoint at the end of epoch 1 (saves every 30 steps of a 100-step run)
    run = read_run(make_trainer_run(tmp_path / "a", steps=(30, 60, 90, 100)))
    pick = run.pick()
    assert pick.inferior.name == "checkpoint-60" and "middle" in pick.reason and "step 60 of 100" in pick.reason
    # no trainer_state.json: steps from the folder names
    run = read_run(make_trainer_run(tmp_path / "b", steps=(10, 20, 40), states=False))
    assert [c.epoch for c in run.checkpoints] == [None] * 3
    pick = run.pick()
    assert pick.finetuned.name == "checkpoint-40" and pick.inferior.name == "checkpoint-20"
    assert "no epochs recorded" in pick.reason


def test_overrides_by_step_and_path(full_run, tmp_path):
    run = read_run(full_run)
    pick = run.pick(finetuned="75")
    assert pick.finetuned.name == "checkpoint-75" and pick.inferior.name == "checkpoint-25"  # halfway to step 75
    pick = run.pick(finetuned=100, inferior="25")
    assert pick.inferior.name == "checkpoint-25" and "checkpoint-25 (step 25, epoch 0.50), given." in pick.reason
    other = tmp_path / "elsewhere"
    pick = run.pick(inferior=str(other))
    assert pick.inferior == other and any(str(other) in line for line in pick.lines())
    with pytest.raises(InputError, match=r"no checkpoint at step 60; steps: 25, 50, 75, 100"):
        run.pick(inferior="60")
    with pytest.raises(InputError, match="same checkpoint"):
        run.pick(finetuned="50", inferior=50)


def test_cli_convert_run_full_weights(full_run, tmp_path):
    code, out = cli("convert", "--run", full_run, "--mu", 0.5, "--to", "hf", "-o", tmp_path / "b")
    assert code == 0, out
    assert "Run " in out and "<- inferior" in out and "end of epoch 1 of 2" in out
    src = json.loads((tmp_path / "b" / "epicode.json").read_text())["sources"]
    assert Path(src["finetuned"]["path"]).name == "checkpoint-100"
    assert Path(src["inferior"]["path"]).name == "checkpoint-50"
    code, out = cli("convert", "--run", full_run, "--finetuned", 75, "--inferior", 25, "--mu", 0.5, "--to", "hf",
                    "-o", tmp_path / "c")
    assert code == 0, out
    src = json.loads((tmp_path / "c" / "epicode.json").read_text())["sources"]
    assert [Path(src[r]["path"]).name for r in ("finetuned", "inferior")] == ["checkpoint-75", "checkpoint-25"]


def test_cli_convert_run_of_peft_adapters(tmp_path):
    """PEFT checkpoints: the base is the one adapter_config.json names (a local folder), or --base."""
    base = make_hf_model(tmp_path / "base", arch="llama", seed=3)
    run = make_trainer_run(tmp_path / "out", steps=(50, 100), kind="peft", base=base)
    code, out = cli("convert", "--run", run, "--mu", 0.5, "--quant", "F32", "-o", tmp_path / "b")
    assert code == 0, out
    m = json.loads((tmp_path / "b" / "epicode.json").read_text())
    assert m["layout"] == "shared-base"
    assert Path(m["sources"]["base"]["path"]) == base.absolute()
    assert Path(m["sources"]["inferior"]["path"]).name == "checkpoint-50"
    # a base named by the config that is gone: one line asking for --base
    moved = tmp_path / "moved-base"
    shutil.move(base, moved)
    code, out = cli("convert", "--run", run, "--mu", 0.5, "-o", tmp_path / "c")
    assert_one_line_error(code, out, "checkpoint-", "--base")
    code, out = cli("convert", "--run", run, "--base", moved, "--mu", 0.5, "--quant", "F32", "-o", tmp_path / "c")
    assert code == 0, out


def test_mlx_lm_run(tmp_path):
    from mlx_adapters import make_mlx_run

    base = make_hf_model(tmp_path / "base", arch="llama", seed=3)
    make_mlx_run(tmp_path / "run" / "adapters", base, steps=(100, 200, 300, 400), num_layers=1)
    run = read_run(tmp_path / "run")  # mlx_lm's default ./adapters inside it
    assert [(c.step, c.epoch, c.kind) for c in run.checkpoints] == [
        (100, None, "mlx-lora"), (200, None, "mlx-lora"), (300, None, "mlx-lora"), (400, None, "mlx-lora")]
    pick = run.pick()
    assert pick.finetuned.name == "0000400_adapters.safetensors"
    assert pick.inferior.name == "0000200_adapters.safetensors" and "steps, not epochs" in pick.reason
    assert pick.base == base  # the adapter_config's "model"
    code, out = cli("convert", "--run", tmp_path / "run" / "adapters", "--mu", 0.5, "--merge", "--to", "hf",
                    "-o", tmp_path / "b")
    assert code == 0, out
    src = json.loads((tmp_path / "b" / "epicode.json").read_text())["sources"]
    assert Path(src["inferior"]["path"]).name == "0000200_adapters.safetensors"


def test_fewer_than_two_checkpoints_one_line(tmp_path):
    make_trainer_run(tmp_path / "one", steps=(100,))
    code, out = cli("convert", "--run", tmp_path / "one", "--mu", 0.5, "-o", tmp_path / "b")
    assert_one_line_error(code, out, "one", "fewer than two checkpoints", "checkpoint-100")
    (tmp_path / "empty").mkdir()
    code, out = cli("convert", "--run", tmp_path / "empty", "--mu", 0.5, "-o", tmp_path / "b")
    assert_one_line_error(code, out, "no checkpoint-N folders")
    code, out = cli("convert", "--mu", 0.5, "-o", tmp_path / "b")
    assert code == 2 and "--run OUTPUT_DIR" in out
    assert not (tmp_path / "b").exists()


def test_tune_takes_the_run(full_run, tmp_path):
    """tune --run picks the same two checkpoints (shown before the work; here the dev file is missing)."""
    code, out = cli("tune", "--run", full_run, "--dev", tmp_path / "dev.jsonl", "-o", tmp_path / "b")
    assert "checkpoint-50   <- inferior" in out and "checkpoint-100   <- finetuned" in out
    assert_one_line_error(code, out, "dev.jsonl")
