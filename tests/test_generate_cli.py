"""`epicode-edge generate`: streaming, --json, options reaching the runtime, one-line errors."""

import json

import pytest
from click.testing import CliRunner

from epicode_edge.cli import main
from epicode_edge.runtime import load
from rt_models import N_THREADS, bundle_dir, bundle, rt  # noqa: F401 (fixtures)

ENGINE = ["--threads", str(N_THREADS), "--quant", "F32"]


def generate(*args):
    return CliRunner().invoke(main, ["generate", *map(str, args)], catch_exceptions=False)


def test_json_output_matches_the_python_api(bundle, rt):
    res = generate(bundle, "What is 17 + 25?", "--max-tokens", 12, "--json", *ENGINE)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    api = rt.generate("What is 17 + 25?", max_tokens=12)
    assert out["tokens"] == api.tokens and out["text"] == api.text
    assert out["finish_reason"] == api.finish_reason and out["completion_tokens"] == len(out["tokens"])
    assert {"ttft_s", "tokens_per_s", "skip_rate", "changed", "overhead_us_per_token"} <= set(out["timings"])


def test_streams_text_to_stdout_and_stats_to_stderr(bundle, rt):
    res = generate(bundle, "Hello", "--max-tokens", 10, *ENGINE)
    assert res.exit_code == 0
    assert res.stdout == rt.generate("Hello", max_tokens=10).text + "\n"
    assert "tok/s" in res.stderr and "finish:" in res.stderr


def test_options_reach_the_runtime(bundle, rt):
    args = ["--max-tokens", 16, "--lambda", 1.0, "--alpha", 0.3, "--temp", 0.7, "--top-p", 0.9, "--top-k", 20,
            "--min-p", 0.01, "--seed", 5, "--repetition-penalty", 1.1, "--system", "Be terse.", "--json"]
    out = json.loads(generate(bundle, "Hi", *args, *ENGINE).stdout)
    api = rt.generate("Hi", system="Be terse.", max_tokens=16, lam=1.0, alpha=0.3, temp=0.7, top_p=0.9, top_k=20,
                      min_p=0.01, seed=5, repetition_penalty=1.1)
    assert out["tokens"] == api.tokens
    raw = json.loads(generate(bundle, "Hi", "--raw", "--max-tokens", 5, "--json", *ENGINE).stdout)
    assert raw["tokens"] == rt.generate("Hi", raw=True, max_tokens=5).tokens
    assert raw["prompt_tokens"] == len(rt.encode("Hi", raw=True))


def test_stop_strings(bundle, rt):
    full = rt.generate("Hello", max_tokens=30).text
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].isprintable())
    out = json.loads(generate(bundle, "Hello", "--max-tokens", 30, "--stop", stop, "--stop", "\u2603", "--json",
                              *ENGINE).stdout)
    assert out["text"] == full[:full.index(stop)] and out["stopped_by"] == "stop_string"


def test_mlx_backend(bundle):
    res = generate(bundle, "Hello", "--max-tokens", 4, "--backend", "mlx", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["completion_tokens"] <= 4


@pytest.mark.parametrize("args, msg", [
    (["--alpha", "0"], "alpha must be in (0, 1]"),
    (["--alpha", "1.5"], "alpha must be in (0, 1]"),
    (["--lambda", "-0.5"], "lambda must be a finite number >= 0"),
    (["--temp", "-1"], "temp must be a finite number >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-k", "-2"], "top_k must be an integer >= 0"),
    (["--max-tokens", "-1"], "max_tokens must be an integer >= 0"),
    (["--stop", ""], "stop strings must be non-empty"),
    (["--raw", "--system", "x"], "system prompt needs the chat template"),
    (["--quant", "Q4_K_M"], "no GGUF files for quant Q4_K_M"),
    (["--n-ctx", "256"], "more than the context"),
])
def test_bad_options_give_one_line_errors(bundle, args, msg):
    prompt = "word " * 300 if "--n-ctx" in args else "Hi"
    res = generate(bundle, prompt, *args, "--threads", N_THREADS)
    assert res.exit_code == 1
    err = res.stderr.strip()
    assert err.startswith("Error: ") and msg in err and "\n" not in err
    assert res.stdout == ""


def test_not_a_bundle(tmp_path):
    res = generate(tmp_path, "Hi")
    assert res.exit_code == 1 and "not an epicode bundle" in res.stderr


def test_whole_head_is_a_setting_only_when_given(bundle, rt):
    """--whole-head turns the amateur's candidate head off (candidate_head=False); unset, the runtime's default
    stays (the key is not passed); either way the same answer here."""
    import click
    from click.testing import CliRunner

    from epicode_edge.cli import decoding_options

    seen = []

    @click.command()
    @decoding_options
    def cmd(**settings):
        seen.append(settings)

    for args in ([], ["--whole-head"]):
        assert CliRunner().invoke(cmd, args).exit_code == 0
    assert "candidate_head" not in seen[0] and seen[1]["candidate_head"] is False
    out = json.loads(generate(bundle, "Hi", "--whole-head", "--lambda", "1", "--max-tokens", 12, "--json", *ENGINE).stdout)
    assert out["tokens"] == rt.generate("Hi", lam=1.0, max_tokens=12, candidate_head=False).tokens
