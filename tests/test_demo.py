"""The demo command on the shipped family (models/demo), and the shipped family itself."""

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from epicode_edge.apps import demo
from epicode_edge.cli import main

FAMILY = Path(__file__).resolve().parents[1] / "models" / "demo"


def test_shipped_family_is_complete_and_small():
    total = sum(f.stat().st_size for f in FAMILY.rglob("*") if f.is_file())
    assert total < 30 * 2**20
    for role in ("finetuned", "inferior"):
        cfg = json.loads((FAMILY / role / "config.json").read_text())
        assert cfg["model_type"] == "llama"
        assert (FAMILY / role / "model.safetensors").is_file()
        tok = json.loads((FAMILY / role / "tokenizer_config.json").read_text())
        assert "chat_template" in tok and tok["eos_token"] == "<|eot_id|>"
    sizes = {s: sum(1 for _ in open(FAMILY / "data" / f"{s}.jsonl")) for s in ("train", "dev", "test")}
    assert sizes["test"] >= 500 and sizes["train"] <= 1000
    test_prompts = {json.loads(line)["prompt"] for line in open(FAMILY / "data" / "test.jsonl")}
    for split in ("train", "dev"):
        assert not test_prompts & {json.loads(line)["prompt"] for line in open(FAMILY / "data" / f"{split}.jsonl")}
    log = json.loads((FAMILY / "train_log.json").read_text())
    assert log["pretrain_loss"][-1] < log["pretrain_loss"][0]


def test_demo_command_then_reuses_the_bundle(tmp_path, monkeypatch):
    monkeypatch.setenv(demo.CACHE_ENV, str(tmp_path / "cache"))
    res = CliRunner().invoke(main, ["demo", "--family", str(FAMILY), "--examples", "3", "--no-color"])
    assert res.exit_code == 0, res.output
    assert "Made bundle" in res.output
    assert res.output.count("finetuned :") == 3 and res.output.count("EpiCoDe   :") == 3
    assert re.search(r"3 items shown; contrastive decoding changed \d+ picks in the EpiCoDe row\.", res.output)
    assert "Accuracy" not in res.output and "%)" not in res.output.split("[1/3]")[1]  # no rate over 3 items
    res2 = CliRunner().invoke(main, ["demo", "--family", str(FAMILY), "--examples", "1", "--no-color"])
    assert res2.exit_code == 0 and "Reused bundle" in res2.output
    # one demo bundle, reused (the cache folder may also hold the CPU-kernel verdict when this test runs first)
    assert len(list((tmp_path / "cache").glob("demo-*"))) == 1


def test_demo_bad_family(tmp_path):
    res = CliRunner().invoke(main, ["demo", "--family", str(tmp_path)])
    assert res.exit_code == 1 and "missing" in res.output
    res = CliRunner().invoke(main, ["demo", "--examples", "0"])
    assert res.exit_code == 1 and "n must be" in res.output


def test_render_row_marks_changed_picks():
    from epicode_edge.apps.tasks import Item

    row = demo.DemoRow(Item("1", "Compute 2 * 3.", None, "6"), "2 * 3 = 5. Answer: 5", False,
                       [("2 * 3 = ", False), ("6", True), (". Answer: 6", False)], True)
    lines = demo.render_row(1, 1, row, color=False)
    assert "[[6]]" in lines[2] and "1 pick changed" in lines[2] and "right" in lines[2]
    assert "wrong" in lines[1]
    colored = demo.render_row(1, 1, row, color=True)
    assert "\x1b[" in colored[2]


def test_shipped_finetuned_same_logits_in_mlx_and_llamacpp(tmp_path):
    """The shipped checkpoint is HF-Llama compatible: mlx_lm and our F32 GGUF in llama.cpp agree."""
    import mlx.core as mx
    import mlx_lm
    import numpy as np

    from epicode_edge.converters.gguf import hf_to_gguf
    from epicode_edge.runtime import open_backend

    model, tok = mlx_lm.load(str(FAMILY / "finetuned"))
    text = tok.apply_chat_template([{"role": "user", "content": "Compute (7 + 5) * 3 - 4 + 9."}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    want = np.array(model(mx.array([ids]))[0, -1].astype(mx.float32))  # (V,)
    gguf = hf_to_gguf(FAMILY / "finetuned", tmp_path / "ft.gguf", quant="F32")
    b = open_backend(gguf, "llama.cpp", n_ctx=256, kv_type="f32")
    try:
        assert b.tokenize(text, special=True, add_bos=False) == ids
        got = np.array(b.prefill(ids), dtype=np.float32)
    finally:
        b.close()
    assert np.abs(got - want).max() < 1e-3  # F32 weights and an F32 KV cache (the default f16 cache: ~2e-3)
    assert got.argmax() == want.argmax()


SMOLLM2_LIKE = {"mu": 0.5, "lambda": 0.0, "alpha": 0.1, "cd_lambda": 1.0, "examples": ["a", "b"],
                "cd_examples": ["c", "d", "e"],
                "differ": {"source": "recorded", "epicode": {"n": 600, "wins": 6, "losses": 4},
                           "cd": {"n": 600, "wins": 13, "losses": 3}}}


def test_lambda_zero_says_cd_is_off_and_shows_the_cd_row():
    s = dict(SMOLLM2_LIKE)
    head = " ".join(demo.header_lines(s, 6, color=False))
    assert "contrastive decoding is OFF" in head and "CD only" in head and "lambda = 1" in head
    assert "CHOSEN" in head and "finetuned and CD only" in head
    assert demo.shows_cd(s) and demo.examples_of(s) == ["c", "d", "e"]
    on = dict(s, **{"lambda": 0.5})
    assert not demo.shows_cd(on) and demo.examples_of(on) == ["a", "b"]
    assert "OFF" not in " ".join(demo.header_lines(on, 6, color=False))


def test_summary_counts_all_differing_items_never_an_accuracy():
    from epicode_edge.apps.tasks import Item

    rows = [demo.DemoRow(Item(str(i), "q", None, "1"), "1", True, [("2", False)], False, [("1", True)], True)
            for i in range(3)]
    text = "\n".join(demo.summary_lines(rows, dict(SMOLLM2_LIKE)))
    assert "changed 0 picks in the EpiCoDe row and 3 in the CD-only row" in text
    assert "Over all 600 test items (recorded): EpiCoDe was right where finetuned was wrong on 6, wrong where " \
           "it was right on 4; both right or both wrong on the other 590." in text
    assert "CD only was right where finetuned was wrong on 13, wrong where it was right on 3" in text
    assert "%" not in text and "ccuracy" not in text  # 3 chosen rows: no rate
    lines = demo.render_row(1, 1, rows[0], color=False)
    assert lines[3].startswith("  CD only   : [[1]]") and "1 pick changed" in lines[3]
