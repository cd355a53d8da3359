"""Inputs the tools read: nested JSON, bytes that are not UTF-8, --parallel against memory, --n-ctx below the
engine's minimum, runaway and broken chat templates, eval's output place. Property tests over the batch
line parser."""

import json
import os
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rt_models import N_THREADS, bundle, bundle_dir, rt  # noqa: F401 - fixtures

from epicode_edge import runtime as runtime_mod
from epicode_edge.apps import batch
from epicode_edge.errors import InputError
from epicode_edge import chat_template
from epicode_edge.runtime import render_chat

NESTED = "[" * 100_000 + "]" * 100_000


from cli_helpers import cli, one_error_line  # noqa: E402


def run_cli_process(*args, stdin: bytes = b""):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.run([sys.executable, "-m", "epicode_edge.cli", *args], input=stdin, capture_output=True,
                          env=env, timeout=300)


# ------------------------------------------------------------------------------- JSON


def test_a_deeply_nested_batch_line_is_an_error_record(bundle, tmp_path):  # noqa: F811
    lines = [json.dumps({"id": 1, "prompt": "hi"}), '{"id": 2, "prompt": ' + NESTED + "}",
             json.dumps({"id": 3, "prompt": "ho"})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    code, out = cli("batch", bundle, tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--max-tokens", "2",
                    "--quant", "F32", "--threads", N_THREADS)
    assert code == 0, out
    recs = {r["line"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert recs[2] == {"id": None, "line": 2, "error": "line 2: JSON nested too deeply"}
    assert "text" in recs[1] and "text" in recs[3]


def test_a_deeply_nested_manifest_is_one_line_for_generate(bundle, tmp_path):  # noqa: F811
    import shutil

    b = shutil.copytree(bundle, tmp_path / "b")
    (b / "epicode.json").write_text(NESTED)
    code, out = cli("generate", b, "hi")
    assert code == 1 and "nested too deeply" in one_error_line(out)


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                                               max_size=3), max_leaves=12)
line_objects = st.fixed_dictionaries({}, optional={
    "id": json_values, "prompt": json_values, "messages": json_values, "max_tokens": json_values,
    "lambda": json_values, "stop": json_values, "system": json_values, "temp": json_values, "seed": json_values})


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=200) | line_objects.map(lambda o: json.dumps(o).encode()))
def test_parse_line_never_raises(raw):
    item = batch.parse_line(raw, 7)
    assert item is None or isinstance(item, batch.Request) or (set(item) == {"id", "line", "error"} and item["line"] == 7
                                                                and "\n" not in item["error"])
    if isinstance(item, batch.Request):
        assert isinstance(item.id, (str, int)) and (item.prompt is None) != (item.messages is None)


def _blank(raw: bytes) -> bool:
    try:
        return not raw.decode("utf-8").strip().lstrip("\ufeff")
    except UnicodeDecodeError:
        return False


@settings(max_examples=60, deadline=None)
@given(data=st.lists(st.binary(max_size=60) | line_objects.map(lambda o: json.dumps(o).encode()), max_size=8))
def test_parse_input_keeps_every_line_or_reports_it(data):
    text = b"\n".join(data)
    items, dups = batch.parse_input(text)
    lines = [it.line if isinstance(it, batch.Request) else it["line"] for it in items] + [d[1] for d in dups]
    assert len(lines) == len(set(lines)) and all(1 <= n <= text.count(b"\n") + 1 for n in lines)
    blank = {n for n, raw in enumerate(text.split(b"\n"), 1) if _blank(raw)}
    assert set(lines) | blank == set(range(1, text.count(b"\n") + 2))  # each line: kept, reported, or blank


# ------------------------------------------------------------------------------- UTF-8


def test_invalid_utf8_in_a_generate_prompt_is_one_line(bundle):  # noqa: F811
    r = run_cli_process("generate", str(bundle), b"caf\xe9 \xff", "--max-tokens", "2", "--threads", str(N_THREADS))
    err = r.stderr.decode()
    assert r.returncode == 1 and "Traceback" not in err
    assert "Error: the prompt is not valid UTF-8 (byte 0xe9 at character 3)" in err


def test_invalid_utf8_on_chat_stdin_keeps_the_session(bundle):  # noqa: F811
    r = run_cli_process("chat", str(bundle), "--max-tokens", "2", "--threads", str(N_THREADS),
                        stdin=b"bad \xff\xfe bytes\nhello\n/stats\n")
    err = r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err, err
    assert "Error: the message is not valid UTF-8 (byte 0xff at character 4)" in err
    assert "turns: 1" in err  # the next message was answered
    r = run_cli_process("chat", str(bundle), "--max-tokens", "2", "--threads", str(N_THREADS),
                        stdin=b"/system be \xff\nhello\n/show\n")
    err = r.stderr.decode()
    assert r.returncode == 0 and "Error: the system prompt is not valid UTF-8 (byte 0xff at character 3)" in err
    assert "system: (none)" in err and re.search(r"\[\d+ tokens, ", err)  # not kept, and the turn ran


def test_lone_surrogates_in_a_batch_line_are_an_error_record(rt):  # noqa: F811
    req = batch.parse_line(b'{"id": 1, "prompt": "x\\udcff"}', 1)
    rec = batch.run_request(rt, req, {"max_tokens": 2}, compare=False)
    assert rec["error"].startswith("the prompt is not valid UTF-8") or rec["error"].startswith("messages[0] is not")


# ------------------------------------------------------------------------------- memory and context


def test_parallel_is_capped_and_refused_when_caches_cannot_fit(bundle, tmp_path, monkeypatch):  # noqa: F811
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i, "prompt": "hi"}) + "\n" for i in range(2)))
    monkeypatch.setattr(runtime_mod, "available_memory", lambda: 1000)
    code, out = cli("batch", bundle, tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--parallel", "200",
                    "--quant", "F32", "--threads", N_THREADS)
    line = one_error_line(out)
    assert code == 1 and line.startswith("Error: parallel 2: the KV caches need")  # 2 requests: 2 slots, not 200
    assert "lower --parallel or --n-ctx" in line
    assert not (tmp_path / "out.jsonl").exists()
    monkeypatch.undo()
    code, out = cli("batch", bundle, tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--parallel", "200",
                    "--max-tokens", "2", "--quant", "F32", "--threads", N_THREADS)
    assert code == 0, out
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2


def test_kv_cache_estimate_matches_the_model(rt, tmp_path_factory):  # noqa: F811
    from rt_models import pair_dir

    cfg = json.loads((pair_dir(tmp_path_factory) / "finetuned/config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * 2 * head_dim * 2  # K and V, f16
    assert runtime_mod.kv_cache_bytes(rt.expert, 3) == 3 * rt.expert.n_ctx * per_token


def test_n_ctx_below_the_engine_minimum_is_said(bundle):  # noqa: F811
    r = run_cli_process("generate", str(bundle), "hi", "--n-ctx", "8", "--max-tokens", "1", "--quant", "F32",
                        "--threads", str(N_THREADS))
    assert r.returncode == 0, r.stderr.decode()
    assert "Note: llama.cpp uses a context of 256 tokens, not the 8 asked for" in r.stderr.decode()
    r = run_cli_process("generate", str(bundle), "hi", "--n-ctx", "512", "--max-tokens", "1", "--quant", "F32",
                        "--threads", str(N_THREADS))
    assert r.returncode == 0 and "Note:" not in r.stderr.decode()


# ------------------------------------------------------------------------------- chat templates


MESSAGES = [{"role": "user", "content": "hi"}]


def test_ordinary_templates_still_render():
    from factory import CHAT_TEMPLATE

    out = render_chat(CHAT_TEMPLATE, MESSAGES, bos_token="<s>")
    assert out.startswith("<s><|start_header_id|>user") and out.endswith("assistant<|end_header_id|>\n\n")
    assert render_chat("{{ '%5d' % 3 }}|{{ 'ab' * 3 }}|{{ 'x'.center(5) }}|{{ '{:>4}'.format(1) }}", MESSAGES) == \
        "    3|ababab|  x  |   1"


@pytest.mark.parametrize("template", [
    "{{ 'a' * 10**10 }}", "{{ ['a'] * 10**9 }}", "{{ 2 ** 100000000 }}", "{{ '%10000000000s' % 1 }}",
    "{{ 'a'.center(10**10) }}", "{{ 'a'.ljust(10**10) }}", "{{ 'a'|center(10**10) }}", "{{ '{:>10000000000}'.format(1) }}",
    "{{ 'a'|indent(10**10, true) }}",
])
def test_runaway_allocations_are_refused_before_allocating(template):
    with pytest.raises(InputError, match="too large for a chat template"):  # the bound, not a MemoryError
        render_chat(template, MESSAGES)


def test_runaway_loops_and_output_are_bounded(monkeypatch):
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.3)
    with pytest.raises(InputError, match="took more than 0.3 s to render"):
        render_chat("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", MESSAGES)
    monkeypatch.setattr(chat_template, "RENDER_MAX_CHARS", 10_000)
    with pytest.raises(InputError, match="output exceeds 10000 characters"):
        render_chat("{% for i in range(100000) %}{{ 'abcdefgh' }}{% endfor %}", MESSAGES)


def test_a_model_with_a_broken_template_still_answers_raw_prompts(tmp_path):
    """A GGUF made by another tool with a template that is not valid Jinja: it loads (llama-cpp-python's own
    template compilation is skipped), raw prompts work, and a templated prompt is one line naming the model."""
    from factory import make_hf_model

    from epicode_edge.converters.gguf import hf_to_gguf

    hf = make_hf_model(tmp_path / "m", "llama", seed=5)
    cfg = json.loads((hf / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% if %}"
    (hf / "tokenizer_config.json").write_text(json.dumps(cfg))
    g = hf_to_gguf(hf, tmp_path / "m.gguf", quant="F32")
    with runtime_mod.load_models(g, g, n_threads=N_THREADS) as rt:
        assert rt.generate("The quick brown fox", raw=True, max_tokens=4).completion_tokens > 0
        with pytest.raises(InputError, match=r"m\.gguf: chat template failed: .*raw prompt needs no template"):
            rt.generate("Hello")


# ------------------------------------------------------------------------------- eval -o


def test_eval_output_place_is_checked_before_any_work(bundle, tmp_path, monkeypatch):  # noqa: F811
    from epicode_edge.apps import eval as eval_app

    calls = []
    monkeypatch.setattr(eval_app, "evaluate", lambda *a, **k: calls.append(a))
    (tmp_path / "data.jsonl").write_text(json.dumps({"id": 1, "prompt": "1+1?", "answer": "2"}) + "\n")
    (tmp_path / "taken").write_text("x")
    code, out = cli("eval", bundle, tmp_path / "data.jsonl", "-o", tmp_path / "taken")
    assert code == 1 and "exists and is not a folder" in one_error_line(out)
    code, out = cli("eval", bundle, tmp_path / "data.jsonl", "-o", tmp_path / "taken" / "sub")
    assert code == 1 and "taken is not a folder" in one_error_line(out)
    assert calls == []  # refused before any scoring
