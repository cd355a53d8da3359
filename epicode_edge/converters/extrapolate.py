"""Model extrapolation (EpiCoDe step 1): expert = finetuned + mu * (finetuned - inferior), per tensor.

The arithmetic is float32 whatever the storage type; the result is cast back to the storage type
with one rounding. mu is taken as float32. mu = 0 returns the finetuned tensor itself (bit for bit).

    warnings = validate_pair(ft, inf, mu)        # before any output
    for t in iter_expert(ft, inf, mu):           # one tensor in memory at a time
        sink.write(t.name, t.expert)
    for p in iter_expert_rows(ft, inf, mu):      # or a few MB of rows at a time
        sink.write_rows(p.name, p.start, p.expert)
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import numpy as np

from ..errors import MismatchError, NumericError, ParameterError
from .checkpoint import Checkpoint, ContentHasher
from .safetensors_io import FLOAT_TAGS, from_f32, to_f32

CHUNK = 1 << 20  # elements per step of the formula: bounds the float32 temporaries to 4 MB each

# Config fields that differ between two saves of one training run without changing the model.
CONFIG_NOISE = {"_name_or_path", "transformers_version", "_commit_hash", "use_cache"}


class ExtrapolationWarning(UserWarning):
    """mu is unusually large, or the two checkpoints are identical."""


class ExpertTensor(NamedTuple):
    name: str
    tag: str  # storage type of expert / finetuned / inferior: "F32" | "F16" | "BF16"
    expert: np.ndarray  # (shape) storage array
    finetuned: np.ndarray  # (shape) storage array, as read
    inferior: np.ndarray  # (shape) storage array, as read


def check_mu(mu) -> float:
    """mu as a float; ParameterError unless it is a finite number >= 0."""
    try:
        value = float(mu)
    except (TypeError, ValueError):
        raise ParameterError(f"mu must be a number (got {mu!r})") from None
    if not math.isfinite(value) or value < 0:
        raise ParameterError(f"mu must be a finite number >= 0 (got {mu})")
    return value


def extrapolate_tensor(ft: np.ndarray, inf: np.ndarray, mu: float, tag: str) -> np.ndarray:
    """ft + mu * (ft - inf) in float32, cast back to `tag` (one rounding). Storage arrays in and out."""
    if mu == 0:
        return ft
    if ft.shape != inf.shape:
        raise MismatchError(f"shapes differ: {ft.shape} vs {inf.shape}")
    mu32 = np.float32(mu)
    out = np.empty(ft.shape, dtype=from_f32(np.zeros(1, np.float32), tag).dtype)  # (shape) storage
    flat_ft, flat_inf, flat_out = ft.reshape(-1), inf.reshape(-1), out.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow shows as Inf: iter_expert reports it
        for s in range(0, flat_ft.size, CHUNK):
            f = to_f32(np.asarray(flat_ft[s : s + CHUNK]), tag)  # (c,) f32
            e = f - to_f32(np.asarray(flat_inf[s : s + CHUNK]), tag)  # (c,) ft - inf
            e *= mu32
            e += f  # ft + mu * (ft - inf), each step rounded to f32
            flat_out[s : s + CHUNK] = from_f32(e, tag)
    return out


def count_nonfinite(array: np.ndarray, tag: str) -> int:
    """How many NaN/Inf values a storage array holds (bf16 checked on its bits)."""
    flat, n = array.reshape(-1), 0
    for s in range(0, flat.size, CHUNK):
        part = np.asarray(flat[s : s + CHUNK])
        n += int(np.count_nonzero((part & 0x7F80) == 0x7F80) if tag == "BF16" else part.size - np.count_nonzero(np.isfinite(part)))
    return n


def validate_pair(ft: Checkpoint, inf: Checkpoint, mu) -> list[str]:
    """Check that inferior is an earlier save of finetuned's run; return warnings (also issued).

    Raises ParameterError (mu), MismatchError (format, architecture, config, tensor names, shapes,
    dtypes, tokenizer). The message names the field or tensor that differs.
    """
    mu = check_mu(mu)
    if ft.format != inf.format:
        raise MismatchError(f"finetuned {ft.path} is {_fmt(ft)} but inferior {inf.path} is {_fmt(inf)}")
    if ft.arch != inf.arch:
        raise MismatchError(f"architecture differs: finetuned {ft.path} is {ft.arch!r}, "
                            f"inferior {inf.path} is {inf.arch!r}")
    _check_config(ft, inf)
    _check_tensors(ft, inf)
    if ft.tokenizer_hash() != inf.tokenizer_hash():
        a, b = ft.tokenizer_digests(), inf.tokenizer_digests()
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        raise MismatchError(f"tokenizers differ between finetuned {ft.path} and inferior {inf.path} "
                            f"({', '.join(diff[:3])}{' ...' if len(diff) > 3 else ''})")
    warnings = []
    if mu > 1:
        warnings.append(f"mu = {mu} is large: the paper keeps it small (0.1 to 1); too large a mu hurts")
    if ft.path.resolve() == inf.path.resolve():
        warnings.append(f"finetuned and inferior are the same checkpoint ({ft.path}): the expert equals finetuned")
    return warnings


def _fmt(ckpt: Checkpoint) -> str:
    return "an HF folder" if ckpt.format == "hf" else "a GGUF file"


def _check_config(ft: Checkpoint, inf: Checkpoint) -> None:
    def relevant(cfg: dict) -> dict:
        if ft.format == "gguf":  # general.* is naming and provenance, except the architecture
            return {k: v for k, v in cfg.items() if not k.startswith("general.") or k == "general.architecture"}
        return {k: v for k, v in cfg.items() if k not in CONFIG_NOISE}

    a, b = relevant(ft.config), relevant(inf.config)
    for key in sorted(a.keys() | b.keys()):
        if a.get(key) != b.get(key):
            where = "config.json" if ft.format == "hf" else "GGUF metadata"
            raise MismatchError(f"{where} field {key!r} differs: {_brief(a.get(key))} in finetuned {ft.path}, "
                                f"{_brief(b.get(key))} in inferior {inf.path}")


def _brief(v) -> str:
    s = repr(v) if v is not None else "(absent)"
    return s if len(s) <= 60 else s[:57] + "..."


def _check_tensors(ft: Checkpoint, inf: Checkpoint) -> None:
    only_ft = [n for n in ft.tensors if n not in inf.tensors]
    only_inf = [n for n in inf.tensors if n not in ft.tensors]
    if only_ft or only_inf:
        name, side, other = (only_ft[0], "finetuned", "inferior") if only_ft else (only_inf[0], "inferior", "finetuned")
        more = len(only_ft) + len(only_inf) - 1
        raise MismatchError(f"tensor {name!r} is in {side} but not in {other}"
                            f"{f' ({more} more tensors differ)' if more else ''}")
    for name, a in ft.tensors.items():
        b = inf.tensors[name]
        if a.shape != b.shape:
            raise MismatchError(f"tensor {name!r}: shape {a.shape} in finetuned, {b.shape} in inferior")
        if a.dtype != b.dtype:
            raise MismatchError(f"tensor {name!r}: dtype {a.dtype} in finetuned, {b.dtype} in inferior")


class ExpertRows(NamedTuple):
    """A piece of whole rows of one tensor, the tensor seen as (rows, last dim)."""

    name: str
    tag: str
    start: int  # first row of the piece
    rows: int  # rows of the whole tensor
    expert: np.ndarray  # (n, C) storage array
    finetuned: np.ndarray  # (n, C) storage array (float32 for dequantized GGUF types)
    inferior: np.ndarray  # (n, C)
    stored: tuple[np.ndarray, np.ndarray] | None = None  # (finetuned, inferior) rows as stored (GGUF: block bytes)
    stored_type: str = ""  # their type as the checkpoint names it (GGUF: Q8_0, Q4_K, F16...)


def iter_expert(ft: Checkpoint, inf: Checkpoint, mu, *, hashers: tuple[ContentHasher, ContentHasher] | None = None
                ) -> Iterator[ExpertTensor]:
    """Stream the expert, one tensor at a time, in finetuned's file order (call validate_pair first).

    Storage types F32/F16/BF16 are kept; other GGUF types (quants) are dequantized and the expert
    is float32. `hashers` (finetuned, inferior) are fed each tensor as read, for content hashes.
    Raises NumericError naming the tensor if the expert holds NaN/Inf.
    """
    for p in iter_expert_rows(ft, inf, mu, hashers=hashers, chunk_elements=None):
        shape = ft.tensors[p.name].shape
        yield ExpertTensor(p.name, p.tag, *(a.reshape(shape) for a in (p.expert, p.finetuned, p.inferior)))


def iter_expert_rows(ft: Checkpoint, inf: Checkpoint, mu, *, hashers: tuple[ContentHasher, ContentHasher] | None = None,
                     chunk_elements: int | None = CHUNK) -> Iterator[ExpertRows]:
    """iter_expert in pieces of whole rows, about chunk_elements values each (None: whole tensors), so that
    memory is bounded by the piece, not by the largest tensor. Rows are independent: every piece holds
    exactly the values the whole tensor would. The NumericError is the whole tensor's."""
    mu = check_mu(mu)
    for name, info in ft.tensors.items():
        tag = info.dtype if info.dtype in FLOAT_TAGS else "F32"
        n_values = math.prod(info.shape)
        cols = max(info.shape[-1] if len(info.shape) > 1 else n_values, 1)
        rows = n_values // cols
        step = rows if chunk_elements is None else max(1, chunk_elements // cols)
        if hashers:
            hashers[0].begin(info)
            hashers[1].begin(inf.tensors[name])
        whole = _as_rows(ft.read(name), rows), _as_rows(inf.read(name), rows)  # (R, C or bytes per row), mapped
        for start in range(0, rows, step) if rows else [0]:
            stored = whole[0][start:start + step], whole[1][start:start + step]
            if hashers:
                hashers[0].feed(stored[0])
                hashers[1].feed(stored[1])
            a, b = stored if tag == info.dtype else (ft.decode(name, stored[0]), inf.decode(name, stored[1]))
            expert = extrapolate_tensor(a, b, mu, tag)
            if count_nonfinite(expert, tag):
                raise NumericError(_nonfinite_message(name, *_whole(ft, inf, name, tag, mu), tag, mu))
            yield ExpertRows(name, tag, start, rows, expert, a, b, stored, info.dtype)


def _as_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """A stored tensor seen as rows of its last dim (GGUF quant blocks run along it); 1-D: one row."""
    return a.reshape(rows, a.size // rows if rows else 0)


def _whole(ft: Checkpoint, inf: Checkpoint, name: str, tag: str, mu: float):
    """(finetuned, inferior, expert) of a whole tensor, for the message of a non-finite expert."""
    a, b = (ft.read(name), inf.read(name)) if tag == ft.tensors[name].dtype else (ft.read_f32(name), inf.read_f32(name))
    return a, b, extrapolate_tensor(a, b, mu, tag)


def _nonfinite_message(name: str, ft: np.ndarray, inf: np.ndarray, expert: np.ndarray, tag: str, mu: float) -> str:
    for role, array in (("finetuned", ft), ("inferior", inf)):
        if n := count_nonfinite(array, tag):
            return f"tensor {name!r}: the {role} checkpoint holds {n} NaN/Inf values"
    n = count_nonfinite(expert, tag)
    return (f"tensor {name!r}: extrapolation with mu = {mu} produced {n} NaN/Inf values "
            f"(overflow of {tag}); use a smaller mu")
