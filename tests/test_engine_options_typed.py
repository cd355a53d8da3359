"""EngineOptions: one typed, checked object for how load() opens the models; the commands' engine options are
made from its fields, and load / eval / tune take it whole (or its fields as keywords, not both)."""

from __future__ import annotations

import dataclasses

import click
import pytest
from click.testing import CliRunner

from cli_helpers import assert_one_line_error, cli
from epicode_edge import engine_options
from epicode_edge.cli import main, runtime_options
from epicode_edge.engine_options import EngineOptions
from epicode_edge.errors import ParameterError
from epicode_edge.runtime import load, load_models, open_pair
from rt_models import N_THREADS, bundle  # noqa: F401  (fixture)


def _probe_command():
    """A click command with the runtime options, returning the EngineOptions it was handed."""
    @click.command()
    @runtime_options
    def cmd(engine, overlap):
        click.echo(repr((engine, overlap)))
        cmd.got = engine
    return cmd


def test_a_new_field_becomes_an_option_of_the_commands(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Wider(EngineOptions):
        flash: str | None = dataclasses.field(default=None, metadata=engine_options._cli(
            "--flash-mode", envvar="EPICODE_EDGE_FLASH", help="A field added later."))
        internal: int = 7  # no "cli" metadata: not an option

    monkeypatch.setattr(engine_options, "EngineOptions", Wider)
    cmd = _probe_command()
    names = {p.name: p for p in cmd.params}
    assert "flash" in names and "internal" not in names
    assert names["flash"].opts == ["--flash-mode"] and names["flash"].envvar == "EPICODE_EDGE_FLASH"
    r = CliRunner().invoke(cmd, ["--flash-mode", "on", "-c", "512"])
    assert r.exit_code == 0, r.output
    assert cmd.got == Wider(flash="on", n_ctx=512) and cmd.got.internal == 7
    r = CliRunner().invoke(cmd, [], env={"EPICODE_EDGE_FLASH": "env"})
    assert r.exit_code == 0 and cmd.got.flash == "env"


def test_every_cli_field_is_an_option_with_its_flags_envvar_and_default():
    cmd = _probe_command()
    params = {p.name: p for p in cmd.params}
    cli_fields = [f for f in dataclasses.fields(EngineOptions) if "cli" in f.metadata]
    assert {f.name for f in cli_fields} == {"backend", "quant", "amateur_quant", "n_gpu_layers", "n_ctx",
                                           "n_threads", "kv_type", "batch_steps"}
    for f in cli_fields:
        p, m = params[f.name], f.metadata["cli"]
        assert p.opts + p.secondary_opts == list(m["names"]), f.name
        assert p.default == f.default and p.envvar == m["envvar"], f.name
    assert {"-c", "--ctx-size", "-ngl", "-t"} <= {o for p in cmd.params for o in p.opts}
    r = CliRunner().invoke(cmd, [])
    assert r.exit_code == 0 and cmd.got == EngineOptions()  # unset options: the dataclass's defaults


@pytest.mark.parametrize("args,field", [(["-c", "0"], "n_ctx"), (["-t", "0"], "n_threads"),
                                        (["-ngl", "-2"], "n_gpu_layers"), (["--quant", ""], "quant")])
def test_an_invalid_option_fails_in_one_line_before_loading(args, field, tmp_path):
    # the bundle does not exist: the engine option is refused first, naming its field
    code, out = cli("generate", tmp_path / "nowhere", "hi", *args)
    assert_one_line_error(code, out, f"{field} must be")


def test_invalid_engine_options_name_the_field():
    for kw, msg in [(dict(n_ctx=0), "n_ctx must be an integer >= 1, got 0"),
                    (dict(n_threads=1.5), "n_threads must be an integer >= 1, got 1.5"),
                    (dict(backend="vulkan"), "backend must be one of auto, llama.cpp, mlx, got 'vulkan'"),
                    (dict(kv_type="q4_0"), "kv_type must be one of f32, f16, q8_0, got 'q4_0'"),
                    (dict(batch_steps="fast"), "batch_steps must be one of auto, grouped, split, got 'fast'"),
                    (dict(n_batch=True), "n_batch must be an integer >= 1, got True")]:
        with pytest.raises(ParameterError) as e:
            EngineOptions(**kw)
        assert str(e.value) == msg
    with pytest.raises(dataclasses.FrozenInstanceError):
        EngineOptions().n_ctx = 4


def test_engine_or_keywords_not_both(bundle, tmp_path):  # noqa: F811
    with pytest.raises(ParameterError, match="not both"):
        load(bundle, EngineOptions(quant="F32"), n_ctx=512)
    with pytest.raises(ParameterError, match="unknown engine option 'ctx'"):
        load(bundle, ctx=512)
    with pytest.raises(ParameterError, match="engine must be an EngineOptions, got dict"):
        load(bundle, {"quant": "F32"})
    with pytest.raises(ParameterError, match="load_models takes the model files"):
        load_models(tmp_path / "a.gguf", tmp_path / "b.gguf", quant="F32")
    # the two ways give the same runtime
    with load(bundle, EngineOptions(quant="F32", n_ctx=512, n_threads=N_THREADS)) as a, \
            load(bundle, quant="F32", n_ctx=512, n_threads=N_THREADS) as b:
        assert (a.quant, a.expert.n_ctx, a.expert.path.name) == (b.quant, b.expert.n_ctx, b.expert.path.name) == \
            ("F32", 512, "expert-F32.gguf")
        assert a.generate("2+2=", raw=True, max_tokens=4).tokens == b.generate("2+2=", raw=True, max_tokens=4).tokens


def test_kv_type_names_match_the_backend():
    from epicode_edge.backends.llamacpp import KV_TYPES

    assert engine_options.KV_TYPES == tuple(KV_TYPES)
    cache_type = next(f for f in dataclasses.fields(EngineOptions) if f.name == "kv_type").metadata["cli"]
    assert set(cache_type["choices"]) == set(KV_TYPES)


def test_batch_steps_names_match_the_batched_engines():
    from epicode_edge.backends.multiseq import STEP_MODES

    assert engine_options.BATCH_STEPS == STEP_MODES


def test_open_pair_closes_the_first_when_the_second_fails():
    closed = []

    class B:
        def __init__(self, name):
            self.name = name

        def close(self):
            closed.append(self.name)

    def fail(first):
        raise ParameterError(f"cannot open beside {first.name}")

    with pytest.raises(ParameterError, match="cannot open beside expert"):
        open_pair(lambda: B("expert"), fail)
    assert closed == ["expert"]
    e, a = open_pair(lambda: B("expert"), lambda first: B(first.name + "'s amateur"))
    assert (e.name, a.name, closed) == ("expert", "expert's amateur", ["expert"])


def test_serve_takes_overlap_for_its_batched_slots(monkeypatch):
    # serve's slots decode batched (decoding/batch_loop.py), which overlaps the two models' decodes:
    # --overlap/--no-overlap set the runtime's default that Runtime.batch_overlaps reads
    seen = {}

    class FakeRt:
        defaults = __import__("epicode_edge.runtime", fromlist=["Settings"]).Settings()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_load(bundle, engine):
        seen["rt"] = FakeRt()
        return seen["rt"]

    def fake_make_server(rt, cfg, **kw):
        seen["overlap"] = rt.defaults.overlap
        raise SystemExit(0)

    import epicode_edge.apps.serve as serve_app
    import epicode_edge.cli as cli_module

    monkeypatch.setattr(cli_module, "_load", fake_load)
    monkeypatch.setattr(serve_app, "make_server", fake_make_server)
    for flag, want in (("--no-overlap", False), ("--overlap", True), (None, None)):
        seen.clear()
        code, _ = cli("serve", "bundle", *([flag] if flag else []))
        assert code == 0 and seen["overlap"] is want
    assert "--overlap / --no-overlap" in cli("serve", "--help")[1]
