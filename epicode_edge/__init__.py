"""epicode-edge: EpiCoDe (model extrapolation + contrastive decoding) on llama.cpp and MLX.

Public API:
    extrapolate(finetuned, inferior, mu, out)   the extrapolated HF checkpoint alone
    convert(finetuned, inferior, out, mu, ...)  a bundle (GGUF and/or MLX and/or HF)
    load(bundle, backend="auto", ...)           a Runtime with stream(), generate(), chat()
    EngineOptions(backend=, quant=, n_ctx=, ...) how load() opens the models (or the same as keywords)
    set_cpu_repack("auto" | "on" | "off")       llama.cpp's extra CPU kernels (AMX, repacked weights)
    cpu_kernels()                               which of them are used here, and why
    json_schema(schema), regex(r), grammar(g)   structured output: rt.generate(..., constraint=json_schema(s))

Engines (llama_cpp, mlx) are imported lazily, on first use.
"""

from .version import __version__

__all__ = ["__version__", "convert", "extrapolate", "load", "EngineOptions", "Runtime", "set_cpu_repack", "cpu_kernels",
           "json_schema", "regex", "grammar"]


def __getattr__(name):
    if name in ("convert", "extrapolate"):
        from .converters import convert as _convert_mod

        return getattr(_convert_mod, name)
    if name in ("load", "EngineOptions", "Runtime", "set_cpu_repack", "cpu_kernels"):
        from . import runtime as _runtime

        return getattr(_runtime, name)
    if name in ("json_schema", "regex", "grammar"):
        from .decoding import constraint as _constraint

        return getattr(_constraint, name)
    raise AttributeError(f"module 'epicode_edge' has no attribute {name!r}")
