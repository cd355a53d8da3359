"""HF checkpoint -> MLX folder, streamed tensor by tensor; the same folder as mlx_lm.convert writes.

    export_mlx("runs/expert-hf", "bundle/mlx/expert", bits=4)      # a folder mlx_lm.load() reads

mlx_lm.convert loads the model lazily, casts it, quantizes it (affine, per group along the last axis) and
saves it; saving evaluates the whole model, so its peak memory is the whole converted model. Here the same
mlx_lm steps (load with lazy weights, sanitize, cast, quantize_model with its class predicate) run on the
lazy model only to *plan* the folder: every output tensor's name, dtype and shape, read off the unevaluated
arrays, and mlx_lm's shard rule (make_shards). Then each tensor is produced and written on its own, 2-D ones
in pieces of rows read from the memory-mapped input: quantizing rows start:end gives exactly those rows of
the whole tensor's weight, scales and biases (groups run along the last axis). A tensor that mlx_lm's
sanitize makes from something other than one input tensor as it is (none for llama/qwen2/qwen3) is evaluated
whole from the lazy model instead: still one tensor at a time. config.json, the tokenizer files, the model
card and the copied files come from mlx_lm's own code. The folder equals mlx_lm.convert's tensor for tensor
(tests/test_mlx_stream.py), so mlx_lm.convert's own whole-model save is no longer used anywhere.

On Linux (MLX on CPU) a quantized model whose unquantized parts are float16 is pathologically slow to run,
so there the default dtype for quantized exports is float32.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import io
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from epicode_edge.errors import BackendError, InputError, ParameterError, UnsupportedError, require

from .safetensors_io import ClosingSink, SafetensorsFile, SafetensorsWriter

MLX_BITS = (2, 3, 4, 5, 6, 8)
MLX_GROUP_SIZES = (32, 64, 128)
MLX_DTYPES = ("float32", "float16", "bfloat16")
PIECE_BYTES = 16 << 20  # rows of a 2-D tensor per piece: about this many float32 bytes of input

_TAGS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "uint32": "U32", "uint8": "U8",
         "int32": "I32", "int64": "I64", "int8": "I8", "int16": "I16", "float64": "F64", "bool_": "BOOL"}


def export_mlx(hf_dir, out_dir, bits: int | None = None, group_size: int = 64, dtype: str | None = None) -> Path:
    """Write an mlx_lm folder for the HF checkpoint in hf_dir; quantized to `bits` when given.

    dtype: the float type of the weights (of the unquantized parts when quantizing); None keeps the
    checkpoint's torch_dtype, except for quantized exports on Linux, which default to float32.
    out_dir must not exist; it appears only when complete.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    _check_args(hf_dir, out_dir, bits, group_size, dtype)
    if dtype is None and bits is not None and sys.platform.startswith("linux"):
        dtype = "float32"
    tmp = out_dir.with_name(out_dir.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    require("mlx.core", "MLX export (--to mlx)")
    require("mlx_lm.utils", "MLX export (--to mlx)")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # mlx_lm prints progress lines
            _stream_export(hf_dir, tmp, bits, group_size, dtype)
        tmp.rename(out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, ValueError) and "not supported" in str(e):
            raise UnsupportedError(f"{hf_dir}: {_first_line(e)}") from None
        if isinstance(e, Exception) and not isinstance(e, (InputError, UnsupportedError)):
            raise BackendError(f"{hf_dir}: MLX export failed ({_first_line(e)})") from e
        raise
    return out_dir


def mlx_lm_config(config: dict, where: str = "config.json") -> dict:
    """The config fields mlx_lm's model classes read that a transformers >= 5 config.json keeps elsewhere:
    rope_theta and rope_scaling (in rope_parameters, per layer type for Gemma 3), rope_local_base_freq, and
    Gemma 3's sliding_window_pattern (as layer_types). UnsupportedError for a layer pattern mlx_lm cannot run."""
    from .gguf import rope_parameters

    out: dict = {}
    rope, theta_swa = rope_parameters(config)
    if config.get("rope_theta") is None and rope.get("rope_theta") is not None:
        out["rope_theta"] = rope["rope_theta"]
    kind = rope.get("rope_type")
    if config.get("rope_scaling") is None and kind not in (None, "default"):
        out["rope_scaling"] = {**{k: v for k, v in rope.items() if k != "rope_theta"}, "type": kind}
    if config.get("model_type") == "gemma3_text":
        if config.get("rope_local_base_freq") is None and theta_swa is not None:
            out["rope_local_base_freq"] = theta_swa
        types = config.get("layer_types")
        if config.get("sliding_window_pattern") is None and types:
            # mlx_lm: layer i is global when i % n == n - 1
            n = next((n for n in range(1, len(types) + 2)
                      if all((t == "full_attention") == (i % n == n - 1) for i, t in enumerate(types))), None)
            if n is None:
                raise UnsupportedError(f"{where}: layer_types has no global layer every n-th layer, which "
                                       "mlx_lm's gemma3_text needs (sliding_window_pattern)")
            out["sliding_window_pattern"] = n
    return out


@dataclass
class _Job:
    """How to make the output tensors of one step, in file order.

    kind "copy": names[0] = rows of source (file, tensor) cast to dtype.
    kind "quant": names = (weight, scales, biases) = mx.quantize of the cast rows of source.
    kind "lazy": names[0] = the lazy model array `array`, evaluated whole.
    """
    kind: str
    names: tuple[str, ...]
    source: tuple[Path, str] | None = None
    dtype: object = None  # mx dtype the source is cast to
    quant: tuple[int, int, str] | None = None  # group_size, bits, mode
    array: object = None


def _stream_export(hf_dir: Path, out: Path, bits, group_size: int, dtype: str | None) -> None:
    from mlx.utils import tree_flatten, tree_map, tree_map_with_path
    import mlx.core as mx
    import mlx_lm.utils as mu
    from mlx_lm.convert import MODEL_CONVERSION_DTYPES

    # The steps of mlx_lm.convert.convert, up to its save(), all lazy.
    overrides = mlx_lm_config(json.loads((hf_dir / "config.json").read_text()), str(hf_dir / "config.json"))
    model, tokenizer, config = mu.load(str(hf_dir), return_config=True, lazy=True, model_config=overrides or None,
                                       tokenizer_config={"trust_remote_code": False}, trust_remote_code=False)
    if dtype is None:
        dtype = config.get("torch_dtype", None)
    if dtype is None and (text_config := config.get("text_config", None)):
        dtype = text_config.get("dtype", None)
    if dtype in MODEL_CONVERSION_DTYPES:
        cast_to = getattr(mx, dtype)
        cast_predicate = getattr(model, "cast_predicate", lambda _: True)

        def set_dtype(k, v):
            if cast_predicate(k) and mx.issubdtype(v.dtype, mx.floating):
                return v.astype(cast_to)
            return v

        model.update(tree_map_with_path(set_dtype, model.parameters()))
    cast = dict(tree_flatten(model.parameters()))  # name -> lazy array before quantization
    if bits is not None:
        model, config = mu.quantize_model(model, config, group_size, bits, mode="affine")

    weights = dict(tree_flatten(model.parameters()))  # the output tensors, in mlx_lm's order (lazy)
    jobs = _plan(hf_dir, model, weights, cast)
    shards = mu.make_shards(weights)  # reads only nbytes: the same split as mlx_lm's save_model
    specs = {k: (_tag(v.dtype), tuple(v.shape)) for k, v in weights.items()}
    total_size = sum(v.nbytes for v in weights.values())
    index = {"metadata": {"total_size": total_size, "total_parameters": mu.get_total_parameters(model)},
             "weight_map": {}}
    keep_vision_config = "vision_tower" in getattr(model, "model", {})
    # The plan holds what it needs; drop the model's own references so evaluated arrays do not pile up.
    model.update(tree_map(lambda _: mx.array([]), model.parameters()))
    del weights, cast

    out.mkdir(parents=True)
    fmt = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    files = [(fmt.format(i + 1, len(shards)), [(k, *specs[k]) for k in shard]) for i, shard in enumerate(shards)]
    del shards
    inputs: dict[Path, SafetensorsFile] = {}  # headers parsed once per input file
    with _ShardedSink(out, files) as sink:
        while jobs:
            _run(jobs.pop(0), sink, inputs, mx)  # popped: nothing keeps a written tensor alive
    index["weight_map"] = dict(sorted((k, fname) for fname, specs_ in files for k, *_ in specs_))
    with open(out / "model.safetensors.index.json", "w") as f:
        json.dump(index, f, indent=4)

    # The small files, by mlx_lm's own code (as mlx_lm.utils.save does for a local source).
    mu.save_config(config, config_path=out / "config.json", keep_vision_config=keep_vision_config)
    tokenizer.save_pretrained(out)
    for p in ["*.py", "generation_config.json"]:
        for file in glob.glob(str(hf_dir / p)):
            shutil.copy(file, out)
    mu.create_model_card(out, None)
    mx.clear_cache()  # MLX keeps freed piece buffers for reuse: give them back


def _plan(hf_dir: Path, model, weights: dict, cast: dict) -> list[_Job]:
    """One job per output tensor (per quantized layer: one for weight, scales, biases), in file order."""
    sources = _sources(hf_dir, model)
    modules = dict(model.named_modules())
    position = {k: i for i, k in enumerate(weights)}
    jobs: list[_Job] = []
    done: set[str] = set()
    for name, arr in weights.items():
        if name in done:
            continue
        path, _, leaf = name.rpartition(".")
        module = modules.get(path)
        q = (getattr(module, "group_size", None), getattr(module, "bits", None), getattr(module, "mode", "affine"))
        in_quantized = module is not None and None not in q[:2] and leaf in ("weight", "scales", "biases")
        if in_quantized:
            triple = (f"{path}.weight", f"{path}.scales", f"{path}.biases")
            src = sources.get(triple[0])
            if (src is not None and triple[0] in cast and src[1] == tuple(cast[triple[0]].shape) and q[2] == "affine"
                    and all(k in position for k in triple)
                    and [position[k] for k in triple] == list(range(position[name], position[name] + 3))):
                jobs.append(_Job("quant", triple, src[0], cast[triple[0]].dtype, q))
                done.update(triple)
                continue
        else:
            src = sources.get(name)
            if src is not None and name in cast and cast[name].dtype == arr.dtype and src[1] == tuple(arr.shape):
                jobs.append(_Job("copy", (name,), src[0], arr.dtype))
                continue
        jobs.append(_Job("lazy", (name,), array=arr))  # what sanitize or quantization made otherwise
    return jobs


def _sources(hf_dir: Path, model) -> dict:
    """Output names whose value, before cast, is one input tensor as it is: name -> ((file, tensor), shape).

    mlx_lm loads every model*.safetensors with mx.load and passes the dict through the model's sanitize;
    doing the same here tells which entries sanitize left untouched (the same array object)."""
    import mlx.core as mx

    raw: dict = {}
    origin: dict[int, tuple[Path, str]] = {}
    for wf in sorted(glob.glob(str(hf_dir / "model*.safetensors"))):
        arrays = mx.load(wf)
        for k, v in arrays.items():
            origin[id(v)] = (Path(wf), k)
        raw.update(arrays)
    # On a new model of the same class (its arrays lazy, never evaluated): some sanitize methods change the
    # model too (gemma3_text drops its lm_head when the embeddings are tied), and load() already ran it once
    # on this one, so a second call there can fail.
    if hasattr(model, "sanitize"):
        fresh = type(model)(model.args) if hasattr(model, "args") else copy.copy(model)
        kept = fresh.sanitize(dict(raw))
        del fresh
    else:
        kept = dict(raw)
    found = {}
    for k, v in kept.items():
        src = origin.get(id(v))
        if src is not None:
            found[k] = (src, tuple(v.shape))
    del raw, kept
    return found


class _ShardedSink(ClosingSink):
    """The shard files in order, as one writer: each tensor goes to its file, opened when its first tensor
    comes (a quantized layer's weight, scales and biases may straddle two files)."""

    def __init__(self, out: Path, files: list[tuple[str, list]]):
        self._out, self._files = out, files
        self._shard_of = {k: i for i, (_, specs) in enumerate(files) for k, *_ in specs}
        self._i, self._w = -1, None

    def _writer(self, name: str) -> SafetensorsWriter:
        i = self._shard_of[name]
        if i != self._i:
            if self._w is not None:
                self._w.close()  # raises if a declared tensor was never written
            self._i, self._w = i, None
            fname, specs = self._files[i]
            self._w = SafetensorsWriter(self._out / fname, specs, {"format": "mlx"})
        return self._w

    def write(self, name, array) -> None:
        self._writer(name).write(name, array)

    def write_part(self, name, piece) -> bool:
        return self._writer(name).write_part(name, piece)

    def write_chunks(self, name, chunks) -> None:
        self._writer(name).write_chunks(name, chunks)

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
        if self._i != len(self._files) - 1:
            raise ValueError(f"{self._out}: shards after {self._i + 1} never written")

    def abort(self) -> None:
        if self._w is not None:
            self._w.abort()


def _run(job: _Job, w: _ShardedSink, inputs: dict, mx) -> None:
    if job.kind == "lazy":
        a = job.array
        job.array = None
        mx.eval(a)
        w.write(job.names[0], _to_numpy(a, mx))
        return
    path, tensor = job.source
    if path not in inputs:
        inputs[path] = SafetensorsFile(path)
    f = inputs[path]
    e = f.entries[tensor]
    src = f.read(tensor)  # memory-mapped: pieces are read as they are used
    if job.kind == "copy":
        for piece in _row_pieces(src):
            w.write_part(job.names[0], _to_numpy(_mx_of(piece, e.dtype, mx).astype(job.dtype), mx))
        return
    group_size, bits, mode = job.quant
    scales, biases = [], []
    for piece in _row_pieces(src):
        x = _mx_of(piece, e.dtype, mx).astype(job.dtype)  # (rows, in)
        wq, s, b = mx.quantize(x, group_size=group_size, bits=bits, mode=mode)  # (rows, in*bits/32), (rows, in/gs) x2
        mx.eval(wq, s, b)
        w.write_part(job.names[0], _to_numpy(wq, mx))
        scales.append(_to_numpy(s, mx))
        biases.append(_to_numpy(b, mx))
        del x, wq, s, b
    w.write_chunks(job.names[1], scales)
    w.write_chunks(job.names[2], biases)


def _row_pieces(src: np.ndarray):
    """src in pieces of whole rows along axis 0 (a 0-D, 1-D or empty tensor in one piece)."""
    if src.ndim < 2 or src.size == 0:
        yield src
        return
    row = src[0].size * 4  # float32 bytes of one row (the cast is at most float32)
    step = max(1, PIECE_BYTES // row)
    for start in range(0, src.shape[0], step):
        yield src[start:start + step]


def _mx_of(piece: np.ndarray, tag: str, mx):
    a = mx.array(np.ascontiguousarray(piece))  # a private copy of the piece only
    return a.view(mx.bfloat16) if tag == "BF16" else a


def _to_numpy(a, mx) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.asarray(a)  # the evaluated array's buffer, no copy


def _tag(dtype) -> str:
    name = str(dtype).split(".")[-1]
    if name == "bool":
        name = "bool_"
    if name not in _TAGS:
        raise BackendError(f"MLX export: no safetensors type for {dtype}")
    return _TAGS[name]


def _check_args(hf_dir: Path, out_dir: Path, bits, group_size, dtype) -> None:
    if bits is not None and bits not in MLX_BITS:
        raise ParameterError(f"mlx bits {bits!r} not supported; choose one of {', '.join(map(str, MLX_BITS))}")
    if group_size not in MLX_GROUP_SIZES:
        raise ParameterError(
            f"mlx group_size {group_size!r} not supported; choose one of {', '.join(map(str, MLX_GROUP_SIZES))}")
    if dtype is not None and dtype not in MLX_DTYPES:
        raise ParameterError(f"mlx dtype {dtype!r} not supported; choose one of {', '.join(MLX_DTYPES)}")
    if not (hf_dir / "config.json").is_file():
        raise InputError(f"{hf_dir}: no config.json (not an HF model folder)")
    if out_dir.exists():
        raise InputError(f"{out_dir}: already exists")


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
