"""How load() opens the two models: EngineOptions, the engine and its settings (decoding settings are
runtime.Settings). Kept apart from runtime.py so that cli.py can make its options from the fields without
importing an engine or numpy (cli.py loads llama.cpp's library first)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .errors import ParameterError

BACKENDS = ("auto", "llama.cpp", "mlx")
KV_TYPES = ("f32", "f16", "q8_0")  # the names of backends/llamacpp.py's KV_TYPES (tests/test_engine_options.py)
BATCH_STEPS = ("auto", "grouped", "split")  # backends/multiseq.py's STEP_MODES (tests/test_engine_options.py)


def _cli(*names: str, help: str, type=str, envvar: str | None = None, choices=None,
         show_default: bool = False) -> dict:
    """The command-line form of an EngineOptions field (cli.runtime_options makes its click option from it)."""
    return {"cli": {"names": names, "help": help, "type": type, "envvar": envvar, "choices": choices,
                    "show_default": show_default}}


@dataclass(frozen=True)
class EngineOptions:
    """How load() opens the two models: the engine and its settings (decoding settings are Settings).
    Checked when made: a bad value fails in one line (ParameterError naming the field) before anything loads.
    A field whose metadata has "cli" is an option of the commands that load a bundle (cli.runtime_options)."""

    backend: str = field(default="auto", metadata=_cli(
        "--backend", choices=BACKENDS, envvar="EPICODE_EDGE_BACKEND", show_default=True,
        help="Engine: auto = MLX on Apple silicon when the bundle has MLX models, else llama.cpp."))
    quant: str | None = field(default=None, metadata=_cli(
        "--quant", help="GGUF quant to load (default: the bundle's first)."))
    amateur_quant: str | None = field(default=None, metadata=_cli(
        "--amateur-quant", help="The amateur's GGUF at another quant (e.g. Q4_0 beside a Q8_0 expert: faster, only "
                                "close to the same-quant answers; the bundle must hold it)."))
    n_gpu_layers: int = field(default=0, metadata=_cli(
        "-ngl", "--n-gpu-layers", type=int, envvar="EPICODE_EDGE_N_GPU_LAYERS", show_default=True,
        help="Layers offloaded to CUDA/Metal on llama.cpp (-1 = all)."))
    n_ctx: int = field(default=2048, metadata=_cli(
        "-c", "--n-ctx", "--ctx-size", type=int, envvar="EPICODE_EDGE_N_CTX", show_default=True,
        help="Context size in tokens."))
    n_threads: int | None = field(default=None, metadata=_cli(
        "-t", "--threads", "--n-threads", type=int, envvar="EPICODE_EDGE_THREADS",
        help="CPU threads (default: engine's)."))
    kv_type: str | None = field(default=None, metadata=_cli(
        "--cache-type", choices=("f16", "f32", "q8_0"), envvar="EPICODE_EDGE_CACHE_TYPE",
        help="llama.cpp KV cache type (as -ctk/-ctv): f16 [default], f32 (exact checks: f16 moves logits by ~1e-2), "
             "q8_0 (half the memory; needs flash attention, turned on for it)."))
    batch_steps: str = field(default="auto", metadata=_cli(
        "--batch-steps", choices=BATCH_STEPS, envvar="EPICODE_EDGE_BATCH_STEPS", show_default=True,
        help="Batched decoding on llama.cpp (--parallel > 1, serve): the requests' next tokens in one engine call "
             "(grouped), one call each (split), or whichever this machine runs faster, measured as it decodes "
             "(auto; some CPU kernels cost more for a few tokens at once than one at a time)."))
    n_batch: int = 512  # llama.cpp's prompt batch (at most n_ctx)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ParameterError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        for name in ("quant", "amateur_quant"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ParameterError(f"{name} must be a GGUF quant type name, got {v!r}")
        if not _is_int(self.n_ctx) or self.n_ctx < 1:
            raise ParameterError(f"n_ctx must be an integer >= 1, got {self.n_ctx!r}")
        if self.n_threads is not None and (not _is_int(self.n_threads) or self.n_threads < 1):
            raise ParameterError(f"n_threads must be an integer >= 1, got {self.n_threads!r}")
        if not _is_int(self.n_gpu_layers) or self.n_gpu_layers < -1:
            raise ParameterError(f"n_gpu_layers must be an integer >= -1 (-1 = all), got {self.n_gpu_layers!r}")
        if self.kv_type is not None and self.kv_type not in KV_TYPES:
            raise ParameterError(f"kv_type must be one of {', '.join(KV_TYPES)}, got {self.kv_type!r}")
        if self.batch_steps not in BATCH_STEPS:
            raise ParameterError(f"batch_steps must be one of {', '.join(BATCH_STEPS)}, got {self.batch_steps!r}")
        if not _is_int(self.n_batch) or self.n_batch < 1:
            raise ParameterError(f"n_batch must be an integer >= 1, got {self.n_batch!r}")

    @classmethod
    def of(cls, engine: "EngineOptions | None" = None, **options) -> "EngineOptions":
        """engine as given, or one made of keyword options (not both: a call says its options one way)."""
        if engine is not None:
            if not isinstance(engine, EngineOptions):
                raise ParameterError(f"engine must be an EngineOptions, got {type(engine).__name__}")
            if options:
                raise ParameterError(f"give the engine options in engine or as keywords, not both "
                                     f"({', '.join(sorted(options))} beside engine)")
            return engine
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ParameterError(f"unknown engine option {unknown[0]!r} (options: {', '.join(names)})")
        return cls(**options)

    def changed(self) -> dict:
        """The fields set away from their defaults."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}

    def backend_kwargs(self) -> dict:
        """The keywords of a llama.cpp backend (backends/llamacpp.py, backends/llamacpp_lora.py)."""
        kw = dict(n_ctx=self.n_ctx, n_threads=self.n_threads, n_gpu_layers=self.n_gpu_layers, n_batch=self.n_batch,
                  batch_steps=self.batch_steps)
        return kw if self.kv_type is None else dict(kw, kv_type=self.kv_type)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
