"""Open a checkpoint lazily: an HF folder (single or sharded safetensors) or a GGUF file.

    ckpt = open_checkpoint("runs/epoch2")          # or "model-f16.gguf"
    ckpt.arch, ckpt.config, ckpt.tensors           # names, dtypes, shapes, in file order
    w = ckpt.read_f32("model.embed_tokens.weight")  # one tensor at a time, memory-mapped

Nothing is loaded at open time except headers. Every problem with the input is a one-line
CheckpointError naming the file (and the tensor, where there is one).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..hashing import sha256_file
from ..errors import CheckpointError
from .multimodal import is_multimodal, text_config, text_tensor_name
from .safetensors_io import FLOAT_TAGS, STORAGE, SafetensorsFile, check_input_file, to_f32

# Files that define the tokenizer (hashed to compare two checkpoints, copied into HF outputs).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt",
)
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # HF: safetensors tag "F32" | "F16" | "BF16"; GGUF: ggml type name ("F16", "Q8_0", ...)
    shape: tuple[int, ...]  # numpy order (rows first), as HF stores it
    nbytes: int = 0  # stored size


class Checkpoint:
    """Common face of an HF folder and a GGUF file. Subclasses fill the attributes and `read`."""

    path: Path
    format: str  # "hf" | "gguf"
    arch: str  # HF model_type, or GGUF general.architecture
    config: dict
    tensors: dict[str, TensorInfo]
    tokenizer_dir: Path | None = None

    def read(self, name: str) -> np.ndarray:
        """The stored array of one tensor (BF16 as uint16 bits; GGUF quants as raw blocks)."""
        raise NotImplementedError

    def read_f32(self, name: str) -> np.ndarray:
        """One tensor as float32 (dequantized where needed)."""
        raise NotImplementedError

    def decode(self, name: str, stored: np.ndarray) -> np.ndarray:
        """float32 values (n, C) of rows n of tensor `name` as stored: (n, C) for float types, (n, bytes per
        row) for GGUF quants (their blocks run along the last dim)."""
        return to_f32(stored, self.tensors[name].dtype)

    def tokenizer_digests(self) -> dict[str, str]:
        """sha256 of each part of the tokenizer (file names for HF, metadata keys for GGUF)."""
        raise NotImplementedError

    def tokenizer_hash(self) -> str:
        """One sha256 over the whole tokenizer: equal for checkpoints that tokenize alike."""
        h = hashlib.sha256()
        for key, digest in sorted(self.tokenizer_digests().items()):
            h.update(f"{key}={digest}\n".encode())
        return h.hexdigest()

    @property
    def nbytes(self) -> int:
        """Stored size of all tensors."""
        return sum(t.nbytes for t in self.tensors.values())

    def content_hasher(self) -> "ContentHasher":
        return ContentHasher(self.config)

    def content_hash(self) -> str:
        """sha256 over the config and every tensor (name, dtype, shape, bytes): one full read."""
        hasher = self.content_hasher()
        for name, info in self.tensors.items():
            hasher.update(info, self.read(name))
        return hasher.hexdigest()

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.arch} {len(self.tensors)} tensors at {self.path}>"


class ContentHasher:
    """Hashes a checkpoint's content tensor by tensor, so a streaming pass gets it for free."""

    def __init__(self, config: dict):
        self._h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())

    def update(self, info: TensorInfo, array: np.ndarray) -> None:
        self.begin(info)
        self.feed(array)

    def begin(self, info: TensorInfo) -> None:
        """Start a tensor; its stored bytes follow through feed(), in one or more pieces in order."""
        self._h.update(f"{info.name}|{info.dtype}|{list(info.shape)}\n".encode())

    def feed(self, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array)
        if a.size:
            self._h.update(memoryview(a.reshape(-1)).cast("B"))

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """An HF folder or a GGUF file, opened lazily. Raises CheckpointError with one line naming the file."""
    path = Path(path).expanduser()
    check_input_file(path, folder_ok=True)  # a FIFO or a device would block or never end: refused unopened
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise CheckpointError(f"{path}: permission denied")
    if path.is_dir():
        return HFCheckpoint(path)
    if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        return GGUFCheckpoint(path)
    raise CheckpointError(f"{path}: not an HF model folder or a .gguf file")


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: invalid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: invalid JSON (expected an object)")
    return data


# ----------------------------------------------------------------------------------------------
# HF folder
# ----------------------------------------------------------------------------------------------


class HFCheckpoint(Checkpoint):
    """config.json + model.safetensors, or shards with or without model.safetensors.index.json."""

    format = "hf"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tokenizer_dir = self.path
        files = self._weight_files()
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{cfg_path}: missing (not an HF model folder)")
        self.config = _read_json(cfg_path)
        self.arch = self.config.get("model_type") or ""
        if not isinstance(self.arch, str) or not self.arch:
            raise CheckpointError(f"{cfg_path}: no 'model_type' field")
        self.multimodal = None  # the model_type of a multimodal checkpoint whose text model this is
        if is_multimodal(self.config):  # its text model (converters/multimodal.py)
            self.multimodal = self.arch
            self.config = text_config(self.config, str(cfg_path))
            self.arch = self.config["model_type"]
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        self._stored: dict[str, str] = {}  # name -> the name in the file, where they differ
        self.tensors = {}
        self._index(files)

    def _weight_files(self) -> list[str] | dict[str, str]:
        """Index weight_map (name -> file) if there is an index, else the sorted *.safetensors files."""
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no 'weight_map'")
            for fname in dict.fromkeys(weight_map.values()):
                if not (self.path / fname).is_file():
                    raise CheckpointError(f"{index}: references missing shard {fname}")
            return weight_map
        files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            other = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt*"))
            hint = f" (found {other[0]}: PyTorch weights are not supported, save as safetensors)" if other else ""
            raise CheckpointError(f"{self.path}: no weights (*.safetensors) in folder{hint}")
        return files

    def _open(self, fname: str) -> SafetensorsFile:
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(self.path / fname)
        return self._files[fname]

    def _index(self, files) -> None:
        entries = []  # (file rank, offset, TensorEntry, file)
        if isinstance(files, dict):  # from the index: only the tensors it lists, each in its shard
            ranks = {f: i for i, f in enumerate(sorted(set(files.values())))}
            for name, fname in files.items():
                st = self._open(fname)
                if name not in st.entries:
                    raise CheckpointError(f"{st.path}: tensor {name!r} listed in {INDEX_FILE} is not in this shard")
                entries.append((ranks[fname], st.entries[name].start, st.entries[name], st))
        else:
            seen: set[str] = set()
            for rank, fname in enumerate(files):
                st = self._open(fname)
                for e in st.entries.values():
                    if e.name in seen:
                        raise CheckpointError(f"{st.path}: tensor {e.name!r} is also in another shard")
                    seen.add(e.name)
                    entries.append((rank, e.start, e, st))
        for _, _, e, st in sorted(entries, key=lambda t: t[:2]):
            name = e.name
            if self.multimodal is not None:
                try:
                    name = text_tensor_name(e.name)
                except ValueError:
                    raise CheckpointError(f"{st.path}: tensor {e.name!r} is neither the language model's nor the "
                                          f"vision tower's of a {self.multimodal} checkpoint") from None
                if name is None:  # the vision tower's or the projector's: not converted
                    continue
                if name in self.tensors:
                    raise CheckpointError(f"{st.path}: tensor {e.name!r} is stored twice, also as "
                                          f"{self._stored.get(name, name)!r}")
                self._stored[name] = e.name
            if e.dtype not in FLOAT_TAGS:
                raise CheckpointError(
                    f"{st.path}: tensor {e.name!r} has unsupported dtype {e.dtype} (supported: {', '.join(FLOAT_TAGS)})")
            self.tensors[name] = TensorInfo(name, e.dtype, e.shape, e.nbytes)
            self._where[name] = st
        if not self.tensors:
            raise CheckpointError(f"{self.path}: no tensors in the safetensors files")

    def read(self, name: str) -> np.ndarray:
        return self._where[name].read(self._stored.get(name, name))

    def read_f32(self, name: str) -> np.ndarray:
        return to_f32(self.read(name), self.tensors[name].dtype)

    def tokenizer_digests(self) -> dict[str, str]:
        return {f: sha256_file(self.path / f) for f in TOKENIZER_FILES if (self.path / f).is_file()}

    def close(self) -> None:
        for st in self._files.values():
            st.close()


# ----------------------------------------------------------------------------------------------
# GGUF file
# ----------------------------------------------------------------------------------------------

_GGUF_DIRECT = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


class GGUFCheckpoint(Checkpoint):
    """A GGUF file read with gguf-py's GGUFReader; tensors mapped one at a time.

    Tensor names are GGUF names (blk.0.attn_q.weight), shapes in numpy order; dtype is the ggml
    type name. F32/F16/BF16 read as stored, other types are dequantized by gguf.quants.
    """

    format = "gguf"

    def __init__(self, path: Path):
        from gguf import GGMLQuantizationType

        from .gguf_file import read_header

        self.path = Path(path)
        size = self.path.stat().st_size
        self.header = header = read_header(self.path)  # kept: a GGUF output copies its metadata
        raw = [(t.name, GGMLQuantizationType(t.ggml_type), tuple(reversed(t.dims)), t.nbytes, t.offset)
               for t in header.tensors]
        # the tokenizer's arrays (~100k strings on a real model) are read from the file when asked for
        self.tokenizer_fields = _Subset(header.meta, [k for k in header.types if k.startswith("tokenizer.")])
        self.config = {k: header.meta[k] for k in header.types if not k.startswith("tokenizer.")}
        self._tokenizer_digests: dict[str, str] | None = None
        self.arch = self.config.get("general.architecture") or ""
        if not self.arch:
            raise CheckpointError(f"{self.path}: no general.architecture in GGUF metadata")
        self.tensors, self._where = {}, {}
        for name, qtype, shape, nbytes, offset in raw:
            if offset + nbytes > size:
                raise CheckpointError(f"{self.path}: truncated: tensor {name!r} ends at byte {offset + nbytes}, "
                                      f"file has {size}")
            self.tensors[name] = TensorInfo(name, qtype.name, shape, nbytes)
            self._where[name] = (qtype, offset)
        if not self.tensors:
            raise CheckpointError(f"{self.path}: no tensors in GGUF file")

    def read(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        qtype, offset = self._where[name]
        if info.nbytes == 0:
            return np.zeros(info.shape, dtype=_GGUF_DIRECT.get(info.dtype, np.uint8))
        if info.dtype in _GGUF_DIRECT:
            return np.memmap(self.path, dtype=_GGUF_DIRECT[info.dtype], mode="r", offset=offset, shape=info.shape)
        from gguf import quant_shape_to_byte_shape

        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=offset,
                         shape=quant_shape_to_byte_shape(info.shape, qtype))

    def read_f32(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        if info.dtype in FLOAT_TAGS:
            return to_f32(self.read(name), info.dtype)
        from .gguf_file import dequantize

        try:
            return dequantize(self.read(name), int(self._where[name][0]), info.shape)
        except NotImplementedError:
            raise CheckpointError(f"{self.path}: tensor {name!r}: cannot dequantize type {info.dtype}") from None

    def decode(self, name: str, stored: np.ndarray) -> np.ndarray:
        info = self.tensors[name]
        if info.dtype in FLOAT_TAGS:
            return to_f32(stored, info.dtype)
        from .gguf_file import dequantize

        cols = info.shape[-1] if info.shape else 1
        try:
            return dequantize(stored, int(self._where[name][0]), (stored.shape[0], cols))  # (n, C)
        except NotImplementedError:
            raise CheckpointError(f"{self.path}: tensor {name!r}: cannot dequantize type {info.dtype}") from None

    def tokenizer_digests(self) -> dict[str, str]:
        if self._tokenizer_digests is None:  # one key at a time: the decoded arrays are not kept
            stored = self.header.stored(self.tokenizer_fields)
            self._tokenizer_digests = {k: _json_digest(self.tokenizer_fields, k, v) for k, v in stored.items()}
        return dict(self._tokenizer_digests)


_JSON_DIGESTS: dict[bytes, str] = {}  # sha256 of a stored value -> sha256 of its JSON (two saves of a run share them)


def _json_digest(values: Mapping, key: str, stored: bytes) -> str:
    """sha256 of a metadata value's JSON, computed once per stored value (decoding 100k strings takes ~0.1 s)."""
    memo = hashlib.sha256(stored).digest()
    if memo not in _JSON_DIGESTS:
        if len(_JSON_DIGESTS) > 64:
            _JSON_DIGESTS.clear()
        _JSON_DIGESTS[memo] = hashlib.sha256(json.dumps(values[key], default=str).encode()).hexdigest()
    return _JSON_DIGESTS[memo]


class _Subset(Mapping):
    """Some keys of a mapping, values looked up when asked for."""

    def __init__(self, values: Mapping, keys: list[str]):
        self._values, self._keys = values, keys

    def __getitem__(self, key):
        if key not in self._keys:
            raise KeyError(key)
        return self._values[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


assert set(FLOAT_TAGS) <= set(STORAGE)
