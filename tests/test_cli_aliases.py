"""Flags llama.cpp and Ollama users type (-n, -c, -ngl, -t, -p, -f, -, --ctx-size, --n-predict,
--repeat-penalty) as aliases of epicode-edge's own names: the same parameter, the same answer."""

import json

import pytest
from click.testing import CliRunner

from epicode_edge.cli import main
from rt_models import N_THREADS, bundle_dir, bundle, rt  # noqa: F401 (fixtures)

ENGINE = ["--quant", "F32"]


def params(command: str, args: list[str]) -> dict:
    """The parameters click parses for `epicode-edge COMMAND ARGS` (nothing is run)."""
    cmd = main.commands[command]
    with cmd.make_context(command, [str(a) for a in args]) as ctx:
        return ctx.params


@pytest.mark.parametrize("command,first", [("generate", ["B", "hi"]), ("chat", ["B"]),
                                           ("batch", ["B", "in.jsonl", "-o", "out.jsonl"]), ("serve", ["B"]),
                                           ("eval", ["B", "d.jsonl"])])
def test_engine_aliases_set_the_same_parameters(command, first):
    long = params(command, first + ["--n-ctx", 512, "--n-gpu-layers", 3, "--threads", 2])
    short = params(command, first + ["-c", 512, "-ngl", 3, "-t", 2])
    spelled = params(command, first + ["--ctx-size", 512, "--n-gpu-layers", 3, "--n-threads", 2])
    assert (long["n_ctx"], long["n_gpu_layers"], long["n_threads"]) == (512, 3, 2)
    for p in (short, spelled):
        assert (p["n_ctx"], p["n_gpu_layers"], p["n_threads"]) == (512, 3, 2)


@pytest.mark.parametrize("command,first", [("generate", ["B", "hi"]), ("chat", ["B"]),
                                           ("batch", ["B", "in.jsonl", "-o", "out.jsonl"])])
def test_decoding_aliases_set_the_same_parameters(command, first):
    long = params(command, first + ["--max-tokens", 7, "--repetition-penalty", 1.3])
    for alias in (["-n", 7, "--repeat-penalty", 1.3], ["--n-predict", 7, "--repeat-penalty", 1.3]):
        p = params(command, first + alias)
        assert (p["max_tokens"], p["repetition_penalty"]) == (long["max_tokens"], long["repetition_penalty"]) \
            == (7, 1.3)


@pytest.mark.parametrize("command,first", [("eval", ["B", "d.jsonl"]), ("demo", []),
                                           ("tune", ["--finetuned", "a", "--inferior", "b", "--dev", "d", "-o", "o"])])
def test_max_tokens_aliases_in_eval_tune_demo(command, first):
    assert params(command, first + ["-n", 9])["max_tokens"] == 9
    assert params(command, first + ["--n-predict", 9])["max_tokens"] == 9


def test_demo_count_has_its_own_name():
    p = params("demo", ["--examples", 2, "-n", 5, "-t", 1])
    assert (p["n"], p["max_tokens"], p["n_threads"]) == (2, 5, 1)


def test_help_shows_both_names():
    out = CliRunner().invoke(main, ["generate", "--help"]).output
    for a, b in [("-n,", "--max-tokens"), ("--n-predict", "--max-tokens"), ("-c,", "--ctx-size"),
                 ("-ngl,", "--n-gpu-layers"), ("-t,", "--threads"), ("-p,", "--prompt"), ("-f,", "--file"),
                 ("--repetition-penalty", "--repeat-penalty")]:
        line = next((ln for ln in out.splitlines() if a in ln), "")
        assert b in line, (a, b, out)
    assert "--examples" in CliRunner().invoke(main, ["demo", "--help"]).output


def gen(*args, input=None):
    return CliRunner().invoke(main, ["generate", *map(str, args)], input=input, catch_exceptions=False)


def test_prompt_from_option_file_and_stdin_gives_the_same_answer(bundle, rt, tmp_path):
    prompt = "What is 17 + 25?"
    expect = rt.generate(prompt, max_tokens=8).tokens
    f = tmp_path / "p.txt"
    f.write_text(prompt, encoding="utf-8")
    runs = {
        "positional": gen(bundle, prompt, "--max-tokens", 8, "--json", *ENGINE),
        "-p": gen(bundle, "-p", prompt, "-n", 8, "--json", "-t", N_THREADS, *ENGINE),
        "-f": gen(bundle, "-f", f, "--n-predict", 8, "--json", *ENGINE),
        "- (stdin)": gen(bundle, "-", "-n", 8, "--json", *ENGINE, input=prompt),
        "-f - (stdin)": gen(bundle, "-f", "-", "-n", 8, "--json", *ENGINE, input=prompt),
    }
    for how, res in runs.items():
        assert res.exit_code == 0, (how, res.output)
        assert json.loads(res.stdout)["tokens"] == expect, how


def test_prompt_given_twice_or_never_is_a_usage_error(bundle):
    for args in (["hi", "-p", "hi"], [], ["-p", "a", "-f", "-"]):
        res = CliRunner().invoke(main, ["generate", str(bundle), *args])
        assert res.exit_code == 2 and "give the prompt once" in res.output, args
