"""Write an HF checkpoint folder tensor by tensor: sharded safetensors + index, config, tokenizer.

    with HFSink(out, config, ckpt.tensors, tokenizer_dir=ckpt.path) as sink:
        for name, array in ...:          # in the declared order, storage arrays (BF16 as uint16 bits)
            sink.write(name, array)

Shards are planned up front from the tensor list (each file's header is written first), so memory
holds one tensor at a time. mlx_lm.load() and transformers read the result.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .checkpoint import INDEX_FILE, TOKENIZER_FILES, TensorInfo
from .safetensors_io import STORAGE, ClosingSink, SafetensorsWriter

MAX_SHARD_BYTES = 5 * 10**9  # as transformers' save_pretrained("5GB")
EXTRA_FILES = ("generation_config.json",)


def plan_shards(tensors: list[TensorInfo], max_shard_bytes: int) -> list[list[TensorInfo]]:
    """Consecutive groups of tensors, each at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + _nbytes(t) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += _nbytes(t)
    return shards


def _nbytes(t: TensorInfo) -> int:
    return int(np.prod(t.shape, dtype=np.int64)) * STORAGE[t.dtype].itemsize


class HFSink(ClosingSink):
    """Streams one HF checkpoint into out_dir (which must not hold another checkpoint)."""

    def __init__(self, out_dir, config: dict, tensors, tokenizer_dir=None, max_shard_bytes: int = MAX_SHARD_BYTES):
        self.out_dir = Path(out_dir)
        infos = list(tensors.values()) if isinstance(tensors, dict) else list(tensors)
        self.shards = plan_shards(infos, max_shard_bytes)
        n = len(self.shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self.config = config
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._shard = -1
        self._left = 0
        self._writer: SafetensorsWriter | None = None

    def _next_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._shard += 1
        specs = [(t.name, t.dtype, t.shape) for t in self.shards[self._shard]]
        self._writer = SafetensorsWriter(self.out_dir / self.files[self._shard], specs, {"format": "pt"})
        self._left = len(specs)

    def write(self, name: str, array: np.ndarray) -> None:
        """The next tensor (declared order), as a storage array of its declared dtype."""
        if self._left == 0:
            self._next_shard()
        self._writer.write(name, array)
        self._left -= 1

    def write_part(self, name: str, piece: np.ndarray) -> None:
        """The next piece of a tensor (split along its first axis; pieces in order), so that the writer never
        holds the whole tensor; the bytes are those write() gives."""
        if self._left == 0:
            self._next_shard()
        if self._writer.write_part(name, piece):
            self._left -= 1

    def close(self) -> Path:
        """Finish the last shard, write index (if sharded), config and tokenizer files."""
        if self._shard < len(self.shards) - 1 or self._left:
            raise ValueError(f"{self.out_dir}: HFSink closed before all tensors were written")
        if self._writer is not None:
            self._writer.close()
        if len(self.files) > 1:
            weight_map = {t.name: f for f, group in zip(self.files, self.shards) for t in group}
            total = sum(_nbytes(t) for group in self.shards for t in group)
            (self.out_dir / INDEX_FILE).write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (self.out_dir / "config.json").write_text(json.dumps(self.config, indent=2))
        if self.tokenizer_dir is not None:
            for fname in TOKENIZER_FILES + EXTRA_FILES:
                if (self.tokenizer_dir / fname).is_file():
                    shutil.copyfile(self.tokenizer_dir / fname, self.out_dir / fname)
        return self.out_dir

    def abort(self) -> None:
        """Close open files; the caller removes the folder."""
        if self._writer is not None:
            self._writer.abort()
