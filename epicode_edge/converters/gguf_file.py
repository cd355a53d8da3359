"""Read GGUF files fast: the header (metadata and tensor directory) and tensors dequantized at native speed.

gguf-py's GGUFReader parses every element of every metadata array through numpy views: ~10-25 s for the
49k-token vocabulary and merges of a real model, before one tensor is read. `read_header` parses the same
header with struct from a memory map (tens of ms: arrays are walked over, and parsed only when asked for):
`meta` holds the values GGUFReader's `contents()` gives, `raw` the same with strings as their stored bytes,
`types` each key's (type, array element type), and `stored()` the values' bytes, for copying metadata exactly.

`dequantize` and `quantize` convert between float32 and a ggml type with llama.cpp's own code (the type
traits' `to_float`, `ggml_quantize_chunk`, through the library llama-cpp-python ships), checked against
gguf-py's block layout and bit-identical to gguf-py's numpy versions (tested), which are the fallback where
that library is missing.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from .safetensors_io import check_input_file

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF metadata value types: struct format of the scalar ones
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9
MAX_ARRAY_DEPTH = 16  # arrays of arrays of ...: deeper is refused (Python's recursion limit is ~1000)
INT64_MAX = 2**63 - 1  # ggml counts a tensor's elements in int64


class Header:
    """A GGUF file's metadata and tensor directory.

    Scalars and strings are parsed at open; arrays (the tokenizer's vocabulary, merges, scores: ~100k
    elements on a real model) only when asked for, from the file, and not kept: `raw` and `meta` are
    read-only mappings. `stored(keys)` gives values as the file stores them, for copying them exactly.
    """

    def __init__(self, path: Path, types: dict, spans: dict, scalars: dict, tensors: list):
        self.path = path
        self.types = types        # key -> (GGUF value type, element type of an array or None)
        self.spans = spans        # key -> (start, stop): the value in the file, its type field included
        self._scalars = scalars   # key -> value, for all but arrays (strings as bytes)
        self.tensors = tensors    # TensorEntry, in file order
        self.raw = _Values(self, decode=False)   # key -> value, strings as bytes
        self.meta = _Values(self, decode=True)   # key -> value with strings decoded (as gguf-py's contents())

    def _value(self, key: str, decode: bool):
        if key in self._scalars:
            return _decoded(self._scalars[key]) if decode else self._scalars[key]
        start, stop = self.spans[key]  # KeyError for an absent key
        data = _read_bytes(self.path, start, stop)
        return _Cursor(memoryview(data), self.path).value(decode=decode)

    def stored(self, keys) -> dict[str, bytes]:
        """key -> the value's bytes in the file (type field and payload), read in one go."""
        keys = list(keys)
        if not keys:
            return {}
        lo, hi = min(self.spans[k][0] for k in keys), max(self.spans[k][1] for k in keys)
        data = _read_bytes(self.path, lo, hi)
        return {k: data[self.spans[k][0] - lo:self.spans[k][1] - lo] for k in keys}


class _Values(Mapping):
    def __init__(self, header: Header, decode: bool):
        self._header, self._decode = header, decode

    def __getitem__(self, key):
        return self._header._value(key, self._decode)

    def __iter__(self):
        return iter(self._header.types)

    def __len__(self):
        return len(self._header.types)

    def __contains__(self, key):
        return key in self._header.types


def _read_bytes(path: Path, start: int, stop: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(stop - start)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) != stop - start:
        raise CheckpointError(f"{path}: changed while being read (metadata at byte {start})")
    return data


def _decoded(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    if isinstance(v, list) and v and isinstance(v[0], (bytes, list)):
        return [_decoded(x) for x in v]
    return v


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dims: tuple[int, ...]   # as stored (ne0 first); numpy order is reversed
    ggml_type: int
    offset: int             # absolute, in the file
    nbytes: int


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise CheckpointError(f"{self.path}: corrupted or truncated GGUF file (header runs past the end at "
                                  f"byte {self.pos})")

    def scalar(self, fmt: str):
        n = struct.calcsize(fmt)
        self.need(n)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self) -> bytes:
        n = self.scalar("<Q")
        self.need(n)
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s

    def value(self, vtype: int | None = None, types: list | None = None, parse: bool = True, decode: bool = False,
              depth: int = 0):
        """The value at the cursor, of type vtype (None: read from the type field at the cursor); with
        parse=False an array is only walked over (its elements checked to fit) and None returned; decode:
        strings inside arrays as str (UTF-8, errors replaced), else bytes. Arrays of arrays are taken up to
        MAX_ARRAY_DEPTH deep (llama.cpp takes none)."""
        if vtype is None:
            vtype = self.scalar("<I")
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if types is not None:
                types.append(etype)
            if etype in _NUMPY:
                dt = np.dtype(_NUMPY[etype]).newbyteorder("<")
                self.need(count * dt.itemsize)
                pos, self.pos = self.pos, self.pos + count * dt.itemsize
                return np.frombuffer(self.buf, dtype=dt, count=count, offset=pos).tolist() if parse else None
            if etype == STRING:
                self.need(count * 8)  # at least a length per element
                return self._strings(count, parse, decode)
            if etype == ARRAY:
                if depth + 1 >= MAX_ARRAY_DEPTH:
                    raise CheckpointError(f"{self.path}: corrupted GGUF file (metadata arrays nested more than "
                                          f"{MAX_ARRAY_DEPTH} deep at byte {self.pos})")
                items = [self.value(ARRAY, parse=parse, decode=decode, depth=depth + 1) for _ in range(count)]
                return items if parse else None
        raise CheckpointError(f"{self.path}: corrupted GGUF file (unknown metadata value type {vtype} at byte "
                              f"{self.pos})")

    def _strings(self, count: int, parse: bool, decode: bool) -> list | None:
        """count strings (u64 length + bytes each): the list, or None after checking they fit (parse=False)."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, struct.Struct("<Q").unpack_from
        out = [] if parse else None
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8)  # raises, naming the byte
            (n,) = unpack(buf, pos)
            pos += 8
            if n > size - pos:
                self.pos = pos
                self.need(n)
            if parse:
                out.append(str(buf[pos:pos + n], "utf-8", "replace") if decode else bytes(buf[pos:pos + n]))
            pos += n
        self.pos = pos
        return out


def read_header(path) -> Header:
    """Metadata and tensor directory of a GGUF file; CheckpointError naming the file when the header is not a
    GGUF header or runs past the end, or a tensor's data does."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    check_input_file(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            c = _Cursor(memoryview(mm), path)
            try:
                c.need(4)
                if bytes(c.buf[:4]) != MAGIC:
                    raise CheckpointError(f"{path}: corrupted or truncated GGUF file (no GGUF magic at the start)")
                c.pos = 4
                version, n_tensors, n_kv = c.scalar("<I"), c.scalar("<Q"), c.scalar("<Q")
                if version not in (2, 3):
                    raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 or 3)")
                scalars, types, spans = {}, {}, {}
                for _ in range(n_kv):
                    key = c.string().decode("utf-8", errors="replace")
                    start = c.pos
                    vtype, sub = c.scalar("<I"), []
                    value = c.value(vtype, sub, parse=False)
                    if vtype != ARRAY:
                        scalars[key] = value
                    types[key], spans[key] = (vtype, sub[0] if sub else None), (start, c.pos)
                raw = []
                for _ in range(n_tensors):
                    name = c.string().decode("utf-8", errors="replace")
                    n_dims = c.scalar("<I")
                    if n_dims > 8:
                        raise CheckpointError(f"{path}: corrupted GGUF file (tensor {name!r} has {n_dims} dims)")
                    dims = tuple(c.scalar("<Q") for _ in range(n_dims))
                    raw.append((name, dims, c.scalar("<I"), c.scalar("<Q")))
                align = scalars.get("general.alignment", DEFAULT_ALIGNMENT)
                if not isinstance(align, int) or align <= 0 or align & (align - 1):
                    raise CheckpointError(f"{path}: corrupted GGUF file (general.alignment {align!r})")
                data_start = -(-c.pos // align) * align
            finally:
                c.buf.release()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:  # mmap of an empty file
        raise CheckpointError(f"{path}: corrupted or truncated GGUF file ({e})") from None
    size = path.stat().st_size
    tensors = []
    for name, dims, gtype, rel in raw:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(gtype)]
        except (ValueError, KeyError):
            raise CheckpointError(f"{path}: tensor {name!r} has an unknown ggml type {gtype}") from None
        n = math.prod(dims)  # Python ints: no int64 overflow while checking
        if any(d > INT64_MAX for d in dims) or n > INT64_MAX:
            raise CheckpointError(f"{path}: corrupted GGUF file (tensor {name!r} has dims {list(dims)}: more "
                                  "elements than int64 counts)")
        if dims and n % block:
            raise CheckpointError(f"{path}: tensor {name!r}: {n} elements are not whole blocks of {block}")
        nbytes = n // block * type_size
        offset = data_start + rel
        if offset + nbytes > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {offset + nbytes}, "
                                  f"file has {size}")
        tensors.append(TensorEntry(name, dims, gtype, offset, nbytes))
    return Header(path, types, spans, scalars, tensors)


# ----------------------------------------------------------------------------------------------
# dequantization
# ----------------------------------------------------------------------------------------------


class _Traits(ctypes.Structure):  # ggml.h: struct ggml_type_traits
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_native: dict = {}


def _ggml_base():
    """llama.cpp's ggml base library as shipped by llama-cpp-python, or None. Found where llama_cpp loads its
    libraries from (LLAMA_CPP_LIB_PATH, else the package's lib/) without importing llama_cpp, which would
    load libllama and the CPU backend too (~6 MB of private memory, ~0.1 s) for a few pure functions."""
    if "lib" not in _native:
        _native["lib"] = None
        for folder in _llama_cpp_lib_folders():
            for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
                if (folder / name).is_file():
                    try:
                        lib = ctypes.CDLL(str(folder / name))
                        lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
                        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
                    except (OSError, AttributeError):
                        continue
                    _native["lib"] = lib
                    return lib
    return _native["lib"]


def _llama_cpp_lib_folders():
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        yield Path(override)
        return
    spec = importlib.util.find_spec("llama_cpp")
    for location in (spec.submodule_search_locations or []) if spec else []:
        yield Path(location) / "lib"
    try:  # another layout: next to the library the binding loaded
        import llama_cpp.llama_cpp as lowlevel

        yield Path(lowlevel._lib._name).parent
    except (ImportError, OSError, AttributeError):
        pass


def native_to_float(ggml_type: int):
    """llama.cpp's to_float for a ggml type, when its library is there and agrees with gguf-py on the type's
    name and block layout; else None."""
    key = ("to_float", ggml_type)
    if key not in _native:
        _native[key] = None
        lib = _ggml_base()
        if lib is not None:
            from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

            qtype = GGMLQuantizationType(ggml_type)
            t = lib.ggml_get_type_traits(ggml_type).contents
            if (t.to_float and (t.blck_size, t.type_size) == GGML_QUANT_SIZES[qtype]
                    and (t.type_name or b"").decode().lower() == qtype.name.lower()):
                _native[key] = _TO_FLOAT(t.to_float)
    return _native[key]


def _native_quantize_chunk():
    lib = _ggml_base()
    if lib is None:
        return None
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    return fn


def quantize(rows: np.ndarray, ggml_type: int) -> np.ndarray:
    """rows (R, C) float32 encoded as ggml_type: uint8 (R, bytes per row), as gguf.quants.quantize returns it.
    Types that need an importance matrix (IQ*) are not taken."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    qtype = GGMLQuantizationType(ggml_type)
    if qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(rows, dtype=np.float32).view(np.uint8)
    block, type_size = GGML_QUANT_SIZES[qtype]
    if "quantize_chunk" not in _native:
        _native["quantize_chunk"] = _native_quantize_chunk()
    fn = _native["quantize_chunk"]
    if fn is None or native_to_float(ggml_type) is None or rows.shape[-1] % block:
        from gguf.quants import quantize as numpy_quantize

        return numpy_quantize(rows, qtype)
    src = np.ascontiguousarray(rows, dtype=np.float32)  # (R, C)
    out = np.empty((src.shape[0], src.shape[1] // block * type_size), dtype=np.uint8)  # (R, bytes)
    fn(int(qtype), src.ctypes.data, out.ctypes.data, 0, src.shape[0], src.shape[1], None)
    return out


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values (shape, numpy order) of a tensor's stored bytes (raw: uint8, any layout)."""
    fn = native_to_float(ggml_type)
    n = int(np.prod(shape, dtype=np.int64))
    if fn is None:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as numpy_dequantize

        return numpy_dequantize(raw, GGMLQuantizationType(ggml_type)).reshape(shape)
    src = np.ascontiguousarray(raw).reshape(-1)
    out = np.empty(n, dtype=np.float32)  # (n,)
    fn(src.ctypes.data, out.ctypes.data, n)
    return out.reshape(shape)
