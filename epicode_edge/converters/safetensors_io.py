"""Safetensors read/write in plain numpy, bfloat16 included (no torch, no ml_dtypes).

bfloat16 tensors travel as uint16 arrays holding the raw bits, tagged "BF16"; `bf16_to_f32` and
`f32_to_bf16` (round to nearest even, as torch does) convert. Reading is lazy: the header is parsed
once and each tensor is a view on a read-only memory map, so a tensor costs memory only while used.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError

# safetensors dtype tag -> numpy storage dtype (BF16 is stored as its raw uint16 bits)
STORAGE = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U32": np.dtype("<u4"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_TAGS = ("F32", "F16", "BF16")
_HEADER_LIMIT = 100 * 1024 * 1024


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits -> float32 (exact)."""
    u = bits.astype(np.uint32)
    u <<= 16  # in place: one float32-sized buffer, not two
    return u.view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bits, rounding to nearest even; NaN stays NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    r = u >> 16  # (in-place steps: two uint32 temporaries at most)
    r &= 1
    r += u
    r += 0x7FFF
    r >>= 16
    rounded = r.astype(np.uint16)
    del r
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def to_f32(array: np.ndarray, tag: str) -> np.ndarray:
    """A stored tensor (tagged F32/F16/BF16) as float32."""
    if tag == "BF16":
        return bf16_to_f32(array)
    return array.astype(np.float32, copy=False)


def from_f32(x: np.ndarray, tag: str) -> np.ndarray:
    """float32 -> storage array for tag (F32/F16/BF16)."""
    if tag == "BF16":
        return f32_to_bf16(x)
    return x.astype(STORAGE[tag], copy=False)


_SPECIAL = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_input_file(path: Path, folder_ok: bool = False) -> os.stat_result:
    """os.stat of an input before it is opened: CheckpointError naming it unless it is a regular file (or with
    folder_ok a folder). Opening a FIFO blocks until a writer comes; a device never ends."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file or directory") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if stat.S_ISREG(st.st_mode) or (folder_ok and stat.S_ISDIR(st.st_mode)):
        return st
    kind = next((what for test, what in _SPECIAL if test(st.st_mode)), "not a regular file")
    raise CheckpointError(f"{path}: {kind}, not a model file{' or folder' if folder_ok else ''}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors tag: "F32", "F16", "BF16", ...
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """One .safetensors file, opened lazily: header now, tensors on demand (memory-mapped)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = check_input_file(self.path).st_size
        try:
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", head)
                if n > _HEADER_LIMIT or 8 + n > size:
                    raise CheckpointError(f"{self.path}: corrupted safetensors header (length {n})")
                header = json.loads(f.read(n))
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror or e})") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise CheckpointError(f"{self.path}: corrupted safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupted safetensors header")
        self.metadata: dict = header.pop("__metadata__", None) or {}
        base = 8 + n
        self.entries: dict[str, TensorEntry] = {}
        for name, h in header.items():
            try:
                tag, shape, (s, e) = h["dtype"], h["shape"], h["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: corrupted header entry for tensor {name!r}") from None
            if not isinstance(tag, str) or not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
                raise CheckpointError(f"{self.path}: corrupted header entry for tensor {name!r} (dtype or shape)")
            if not (_is_int(s) and _is_int(e)):
                raise CheckpointError(f"{self.path}: corrupted header entry for tensor {name!r} "
                                      "(data_offsets are not integers)")
            if tag not in STORAGE:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {tag}")
            shape = tuple(shape)
            count = math.prod(shape)  # Python integers: no overflow for absurd shapes
            if e - s != count * STORAGE[tag].itemsize or s < 0:
                raise CheckpointError(f"{self.path}: tensor {name!r} byte range does not match its shape")
            if base + e > size:
                raise CheckpointError(
                    f"{self.path}: truncated: tensor {name!r} ends at byte {base + e}, file has {size}"
                )
            self.entries[name] = TensorEntry(name, tag, shape, base + s, base + e)

    def read(self, name: str) -> np.ndarray:
        """The stored array (read-only, memory-mapped; BF16 as uint16 bits).

        Each tensor gets its own map, released when the array is dropped: streaming a checkpoint
        never keeps more than the tensors in use mapped (RSS stays low, not only private memory).
        """
        e = self.entries[name]
        if e.nbytes == 0:
            return np.zeros(e.shape, dtype=STORAGE[e.dtype])
        try:
            return np.memmap(self.path, dtype=STORAGE[e.dtype], mode="r", offset=e.start, shape=e.shape)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{self.path}: cannot read tensor {name!r} ({err})") from None

    def close(self) -> None:
        pass


def write_safetensors(path: str | os.PathLike, tensors: dict[str, tuple[np.ndarray, str]], metadata: dict | None = None) -> None:
    """Write {name: (array, tag)} to path. Arrays are storage arrays (BF16 as uint16 bits)."""
    with SafetensorsWriter(path, [(n, t, a.shape) for n, (a, t) in tensors.items()], metadata) as w:
        for name, (array, _) in tensors.items():
            w.write(name, array)


class ClosingSink:
    """A writer as a context manager: close() when the block ends normally, abort() when it raises."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


class SafetensorsWriter(ClosingSink):
    """Streams tensors into one .safetensors file whose tensor list is known up front.

    Use as a context manager; `write(name, array)` in the declared order. The header is written first,
    so memory holds one tensor at a time.
    """

    def __init__(self, path, specs: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None):
        self.path = Path(path)
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._order = []
        for name, tag, shape in specs:
            nbytes = int(np.prod(shape, dtype=np.int64)) * STORAGE[tag].itemsize
            header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, tag, tuple(shape), nbytes))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(blob)) + blob)
        self._next = 0

    def write(self, name: str, array: np.ndarray) -> None:
        want, tag, shape, nbytes = self._order[self._next]
        if name != want:
            raise ValueError(f"tensor {name!r} written out of order (expected {want!r})")
        a = np.ascontiguousarray(array, dtype=STORAGE[tag])
        if a.shape != shape:
            raise ValueError(f"tensor {name!r}: shape {a.shape} != declared {shape}")
        try:
            self._f.write(memoryview(a.reshape(-1)).cast("B") if a.size else b"")  # no copy of the tensor
        except OSError as e:  # e.g. a full disk: say which file
            e.filename = e.filename or str(self.path)
            raise
        self._next += 1

    def write_part(self, name: str, piece: np.ndarray) -> bool:
        """The next C-order piece of tensor `name` (split along its first axis), pieces in order; True when it
        completes the tensor. The first piece of a tensor must be the declared next one."""
        want, tag, shape, nbytes = self._order[self._next]
        if name != want:
            raise ValueError(f"tensor {name!r} written out of order (expected {want!r})")
        a = np.ascontiguousarray(piece, dtype=STORAGE[tag])
        self._part = getattr(self, "_part", 0) + a.nbytes
        if self._part > nbytes:
            raise ValueError(f"tensor {name!r}: {self._part} bytes written, {nbytes} declared")
        try:
            self._f.write(memoryview(a.reshape(-1)).cast("B") if a.size else b"")
        except OSError as e:
            e.filename = e.filename or str(self.path)
            raise
        if self._part < nbytes:
            return False
        self._part = 0
        self._next += 1
        return True

    def write_chunks(self, name: str, chunks) -> None:
        """Like write, from an iterable of C-order pieces (the tensor split along its first axis),
        so that a writer never holds a whole tensor."""
        want, tag, shape, nbytes = self._order[self._next]
        if name != want:
            raise ValueError(f"tensor {name!r} written out of order (expected {want!r})")
        done = 0
        for piece in chunks:
            a = np.ascontiguousarray(piece, dtype=STORAGE[tag])
            self._f.write(memoryview(a.reshape(-1)).cast("B") if a.size else b"")
            done += a.nbytes
        if done != nbytes:
            raise ValueError(f"tensor {name!r}: {done} bytes written, {nbytes} declared")
        self._next += 1

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.close()
        if self._next != len(self._order):
            raise ValueError(f"{self.path}: {len(self._order) - self._next} declared tensors never written")

    def abort(self) -> None:
        """Close the file as it is (the caller removes it)."""
        self._f.close()
