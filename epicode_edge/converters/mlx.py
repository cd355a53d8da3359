"""HF checkpoint -> MLX folder (mlx_lm's own converter), quantized or not.

    export_mlx("runs/expert-hf", "bundle/mlx/expert", bits=4)      # a folder mlx_lm.load() reads

mlx_lm.convert loads the HF folder lazily, casts, quantizes (affine, per group) and saves safetensors shards
with config.json and the tokenizer. On Linux (MLX on CPU) a quantized model whose unquantized parts are
float16 is pathologically slow to run, so there the default dtype for quantized exports is float32.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
from pathlib import Path

from epicode_edge.errors import BackendError, InputError, ParameterError, UnsupportedError

MLX_BITS = (2, 3, 4, 5, 6, 8)
MLX_GROUP_SIZES = (32, 64, 128)
MLX_DTYPES = ("float32", "float16", "bfloat16")


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
    try:
        from mlx_lm.convert import convert
    except ImportError as e:
        raise BackendError(f"MLX export needs mlx-lm ({e})") from None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # mlx_lm.convert prints progress lines
            convert(str(hf_dir), str(tmp), quantize=bits is not None, q_bits=bits,
                    q_group_size=group_size if bits is not None else None, dtype=dtype)
        tmp.rename(out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, ValueError) and "not supported" in str(e):
            raise UnsupportedError(f"{hf_dir}: {_first_line(e)}") from None
        if isinstance(e, Exception) and not isinstance(e, (InputError, UnsupportedError)):
            raise BackendError(f"{hf_dir}: MLX export failed ({_first_line(e)})") from e
        raise
    return out_dir


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
