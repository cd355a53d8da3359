"""A GGUF input model, checked before llama.cpp reads it (its quantizer, or the model check of what convert
wrote): any `general.architecture`, its hyperparameters within what llama.cpp's loader takes without
aborting the process, and its chat templates parse.

    check_gguf_input(ckpt)    # CheckpointError / MismatchError / InputError naming the file and the key

llama.cpp's loader asserts (GGML_ASSERT: the process aborts, no message) on some values, e.g. a
`{arch}.block_count` above LLAMA_MAX_LAYERS (src/llama-hparams.h), and reads its integer keys as 32-bit
values (a context_length of 2^32-1 becomes -1). What it refuses with an error (unknown architecture, a
tensor of the wrong shape) is left to llama.cpp: the caller's model check reports it in one line.
"""

from __future__ import annotations

import math
import re

from ..errors import CheckpointError, MismatchError

MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS (src/llama-hparams.h)
MAX_EXPERTS = 1024  # llama.cpp's LLAMA_MAX_EXPERTS (src/llama-hparams.h)
INT32_MAX = 2**31 - 1
_LAYER = re.compile(r"^blk\.(\d+)\.")
# keys that must be >= 1 when present (a zero divides in llama.cpp's loader or graph)
_POSITIVE = ("block_count", "context_length", "embedding_length", "attention.head_count")


def check_gguf_input(ckpt) -> None:
    """A GGUF checkpoint's `{arch}.*` hyperparameters and chat templates (see the module's doc)."""
    check_hparams(ckpt)
    check_chat_templates(ckpt)


def check_hparams(ckpt) -> None:
    where, arch, cfg = ckpt.path, ckpt.arch, ckpt.config
    if not isinstance(arch, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", arch):
        raise CheckpointError(f"{where}: general.architecture {_brief(arch)} is not an architecture name")
    prefix = arch + "."
    for key, value in cfg.items():
        if key.startswith(prefix):
            _check_value(where, key, value)
    for name in _POSITIVE:
        v = cfg.get(prefix + name)
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise CheckpointError(f"{where}: GGUF metadata {prefix + name} is {v} (must be >= 1)")
    blocks = cfg.get(prefix + "block_count")
    if blocks is None:
        raise CheckpointError(f"{where}: GGUF metadata has no {prefix}block_count (llama.cpp needs it)")
    if not isinstance(blocks, int) or isinstance(blocks, bool):
        raise CheckpointError(f"{where}: GGUF metadata {prefix}block_count is {_brief(blocks)}, not an integer")
    stored = sorted({int(m[1]) for n in ckpt.tensors if (m := _LAYER.match(n))})
    if blocks > MAX_LAYERS:
        raise CheckpointError(f"{where}: GGUF metadata {prefix}block_count is {blocks}, more than llama.cpp's "
                              f"limit of {MAX_LAYERS} layers (the weights have {len(stored)})")
    if stored and stored != list(range(blocks)):
        have = f"{len(stored)} layers (blk.{stored[0]} to blk.{stored[-1]})"
        raise MismatchError(f"{where}: GGUF metadata {prefix}block_count is {blocks} but the weights have {have}")
    experts = cfg.get(prefix + "expert_count")
    if isinstance(experts, int) and experts > MAX_EXPERTS:
        raise CheckpointError(f"{where}: GGUF metadata {prefix}expert_count is {experts}, more than llama.cpp's "
                              f"limit of {MAX_EXPERTS}")
    used = cfg.get(prefix + "expert_used_count")
    if isinstance(used, int) and isinstance(experts, int) and used > experts:
        raise CheckpointError(f"{where}: GGUF metadata {prefix}expert_used_count {used} is more than "
                              f"{prefix}expert_count {experts}")


def _check_value(where, key: str, value) -> None:
    """Integers fit llama.cpp's 32-bit fields, floats are finite (scalars and array elements)."""
    items = value if isinstance(value, list) else [value]
    for i, v in enumerate(items):
        at = f"{key}[{i}]" if isinstance(value, list) else key
        if isinstance(v, bool) or isinstance(v, (str, bytes, list)):
            continue
        if isinstance(v, int) and not -INT32_MAX - 1 <= v <= INT32_MAX:
            raise CheckpointError(f"{where}: GGUF metadata {at} is {v}, beyond the 32-bit range llama.cpp reads "
                                  "it in")
        if isinstance(v, float) and not math.isfinite(v):
            raise CheckpointError(f"{where}: GGUF metadata {at} is {v} (must be a finite number)")


def check_chat_templates(ckpt) -> None:
    """Every `tokenizer.chat_template*` string parses as Jinja (a syntax error makes every load fail)."""
    from .tokenizer_meta import check_chat_template

    fields = getattr(ckpt, "tokenizer_fields", {})
    for key in fields:
        if key == "tokenizer.chat_template" or key.startswith("tokenizer.chat_template."):
            check_chat_template(fields[key], f"{ckpt.path}: GGUF metadata {key}")


def _brief(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."
