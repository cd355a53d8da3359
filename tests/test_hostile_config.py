"""Configs and weight files that do not match: one line naming the file and the field (or tensor), before
anything is written, for every config field the exports read."""

import json
import shutil
import struct

import pytest
from click.testing import CliRunner
from factory import make_pair

from epicode_edge.cli import main


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("cfg-pair"), "llama", "float32", seed=3, delta=0.1)


def copy_pair(pair, tmp_path):
    return tuple(shutil.copytree(p, tmp_path / "in" / p.name) for p in pair)


def edit_configs(folders, **changes):
    for f in folders:
        cfg = json.loads((f / "config.json").read_text())
        for k, v in changes.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (f / "config.json").write_text(json.dumps(cfg))


def convert_cli(ft, inf, out, *extra):
    r = CliRunner().invoke(main, ["convert", "--finetuned", str(ft), "--inferior", str(inf), "--mu", "0.5",
                                  "-o", str(out), *extra])
    return r.exit_code, r.output

from cli_helpers import assert_one_line_error  # noqa: E402


def assert_refused(code, output, out, *expect):
    assert_one_line_error(code, output, *expect)
    assert not out.exists() and list(out.parent.iterdir()) == []


CONFIG_CASES = [
    ({"num_hidden_layers": 8}, ["config.json", "num_hidden_layers is 8 but the weights have 2 layers"]),
    ({"num_hidden_layers": 0}, ["num_hidden_layers"]),
    ({"head_dim": 48}, ["config.json", "self_attn", "head_dim"]),
    ({"intermediate_size": 999}, ["config.json", "mlp", "intermediate_size"]),
    ({"vocab_size": 999}, ["embed_tokens", "vocab_size"]),
    ({"hidden_size": 32}, ["hidden_size"]),
    ({"model_type": "qwen3"}, ["model_type 'qwen3' needs tensor", "q_norm"]),
    ({"num_attention_heads": 5}, ["num_attention_heads"]),
    ({"num_attention_heads": 0}, ["num_attention_heads"]),
    ({"num_attention_heads": "4"}, ["num_attention_heads"]),
    ({"num_key_value_heads": 0}, ["num_key_value_heads"]),
    ({"num_key_value_heads": 3}, ["num_key_value_heads 3 does not divide num_attention_heads 4"]),
    ({"rms_norm_eps": "abc"}, ["rms_norm_eps"]),
    ({"max_position_embeddings": 1e30}, ["max_position_embeddings"]),
    ({"max_position_embeddings": -1}, ["max_position_embeddings"]),
    ({"rope_theta": -5}, ["rope_theta"]),
    ({"tie_word_embeddings": "yes"}, ["tie_word_embeddings"]),
]


@pytest.mark.parametrize("changes,expect", CONFIG_CASES, ids=[json.dumps(c[0]) for c in CONFIG_CASES])
@pytest.mark.parametrize("to", ["gguf", "hf"])
def test_config_that_does_not_match_the_weights(pair, tmp_path, changes, expect, to):
    ft, inf = copy_pair(pair, tmp_path)
    edit_configs((ft, inf), **changes)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "b"
    assert_refused(*convert_cli(ft, inf, out, "--to", to), out, *expect)


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n:])


def _first(header):
    return header[next(k for k in header if k != "__metadata__")]


@pytest.mark.parametrize("case,expect", [
    ("offsets-strings", "data_offsets are not integers"),
    ("offsets-floats", "data_offsets are not integers"),
    ("huge-shape", "byte range does not match its shape"),
    ("negative-dim", "(dtype or shape)"),
    ("dtype-list", "(dtype or shape)"),
    ("nested", "corrupted safetensors header"),
])
def test_corrupted_safetensors_headers(pair, tmp_path, case, expect):
    ft, inf = copy_pair(pair, tmp_path)
    f = ft / "model.safetensors"
    if case == "offsets-strings":
        _rewrite_header(f, lambda h: _first(h).update(data_offsets=[str(x) for x in _first(h)["data_offsets"]]))
    elif case == "offsets-floats":
        _rewrite_header(f, lambda h: _first(h).update(data_offsets=[x + 0.5 for x in _first(h)["data_offsets"]]))
    elif case == "huge-shape":
        _rewrite_header(f, lambda h: _first(h).update(shape=[2**32, 2**32], data_offsets=[0, 0]))
    elif case == "negative-dim":
        _rewrite_header(f, lambda h: _first(h).update(shape=[-1, 64]))
    elif case == "dtype-list":
        _rewrite_header(f, lambda h: _first(h).update(dtype=["F32"]))
    else:
        blob = b"[" * 50_000 + b"]" * 50_000
        f.write_bytes(struct.pack("<Q", len(blob)) + blob)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "b"
    assert_refused(*convert_cli(ft, inf, out), out, "model.safetensors", expect)


def test_deeply_nested_config_json(pair, tmp_path):
    ft, inf = copy_pair(pair, tmp_path)
    (ft / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "b"
    assert_refused(*convert_cli(ft, inf, out), out, "config.json", "nested too deeply")


def test_chat_template_syntax_error_is_refused_at_convert(pair, tmp_path):
    ft, inf = copy_pair(pair, tmp_path)
    for f in (ft, inf):
        cfg = json.loads((f / "tokenizer_config.json").read_text())
        cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}"  # no endfor
        (f / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "b"
    assert_refused(*convert_cli(ft, inf, out), out, "tokenizer_config.json", "chat template has a Jinja syntax error",
                   "line 1")


def test_two_lora_ggufs_are_not_two_checkpoints(tmp_path):
    from factory import make_hf_model, make_lora_pair

    from epicode_edge.converters.lora import convert_lora

    base = make_hf_model(tmp_path / "base", "llama", seed=2)
    ft, inf = make_lora_pair(tmp_path / "adapters", base, rank=4, seed=3)
    b = convert_lora(base, ft, inf, tmp_path / "lb", mu=0.5, quant="F32")
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "b"
    assert_refused(*convert_cli(b.path / "lora/finetuned.gguf", b.path / "lora/inferior.gguf", out), out,
                   "finetuned.gguf", "a GGUF LoRA adapter, not a model")


def test_shared_base_lora_checks_the_base_config(tmp_path):
    from factory import make_hf_model, make_lora_pair

    base = make_hf_model(tmp_path / "base", "llama", seed=2)
    ft, inf = make_lora_pair(tmp_path / "adapters", base, rank=4, seed=3)
    edit_configs((base,), intermediate_size=100)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "b"
    code, output = convert_cli(ft, inf, out, "--base", str(base))
    assert_refused(code, output, out, "base/config.json", "mlp", "intermediate_size")
