"""HF checkpoint (or GGUF) -> GGUF, streamed, with gguf-py's writer and llama.cpp's own quantizer.

    hf_to_gguf(hf_dir, "model-Q8_0.gguf", quant="Q8_0")          # one folder -> one file

    sink = GGUFSink(out, config=cfg, tensors={name: (shape, "BF16"), ...}, tokenizer_dir=hf_dir, quant="Q4_K_M")
    for name in tensors:                # any order; one tensor in memory at a time
        sink.write(name, f32_array)     # HF names, numpy shapes
    sink.close()                        # or sink.abort() (also on an exception inside `with sink:`)

The header (metadata + tensor infos) is written first, then each tensor's bytes at its planned offset as it
arrives. Direct types (F32, F16, BF16, Q8_0) are encoded here with gguf.quants, as convert_hf_to_gguf.py
does; the llama.cpp-only types (Q6_K, Q5_K_M, Q4_K_M, Q4_0) go through an intermediate GGUF in the source
precision next to the output, then `llama_cpp.llama_model_quantize` (which picks per-tensor types and falls
back for rows that are not a multiple of the block size, as llama-quantize does). 1-D tensors and norms stay
F32. Output files appear under their final name only when complete.

`GGUFCopySink` is the same for GGUF inputs of any architecture: metadata copied from the source GGUF, tensors in GGUF naming,
whole (`write`) or in pieces of rows (`write_rows`, in order), with the same bytes.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

import gguf
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType as FT

from ..errors import BackendError, CheckpointError, InputError, NumericError, ParameterError, UnsupportedError
from . import gguf_arch
from .gguf_file import Header, read_header
from .gguf_file import quantize as quantize_rows
from .tokenizer_meta import read_tokenizer

# HF model_type -> gguf-py architecture. Mistral, Deepseek-LLM and TinyLlama are Llama in llama.cpp; Phi-3.5
# and Phi-4 are phi3; gemma3_text is the text model of Gemma 3 (Gemma3ForCausalLM; converters/gguf_arch.py).
ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA,
         "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
         "gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3_text": gguf.MODEL_ARCH.GEMMA3, "phi3": gguf.MODEL_ARCH.PHI3}
SUPPORTED_ARCHS = tuple(ARCHS)

# quant -> (file type, tensor type written here; None = written in source precision, then llama.cpp quantizes)
QUANTS = {
    "F32": (FT.ALL_F32, Q.F32),
    "F16": (FT.MOSTLY_F16, Q.F16),
    "BF16": (FT.MOSTLY_BF16, Q.BF16),
    "Q8_0": (FT.MOSTLY_Q8_0, Q.Q8_0),
    "Q6_K": (FT.MOSTLY_Q6_K, None),
    "Q5_K_M": (FT.MOSTLY_Q5_K_M, None),
    "Q4_K_M": (FT.MOSTLY_Q4_K_M, None),
    "Q4_0": (FT.MOSTLY_Q4_0, None),
}
SUPPORTED_QUANTS = tuple(QUANTS)
_SOURCE_TYPE = {"F32": (Q.F32, FT.ALL_F32), "F16": (Q.F16, FT.MOSTLY_F16), "BF16": (Q.BF16, FT.MOSTLY_BF16)}
_SKIP_SUFFIXES = ("rotary_emb.inv_freq",)
_CHUNK_ELEMENTS = 1 << 22  # rows encoded per step: ~16 MB of float32
# The largest magnitude a tensor that llama.cpp quantizes (Q6_K, Q4_K_M, Q4_0, ...) may hold: every ggml block
# type stores its scales (d, and m / dmin) as float16, and beyond this they overflow. llama.cpp's quantizer then
# writes Inf blocks (and fails its own validation, naming no tensor) or, past about 1e19 where x*x overflows in
# its scale search, finite all-zero blocks that load and run (measured: Q6_K from 1e30-scaled float32 weights).
QUANT_INPUT_MAX = float(np.finfo(np.float16).max)  # 65504


def check_quant(quant: str) -> str:
    """The canonical quant name (case-insensitive), or UnsupportedError listing the supported ones."""
    q = str(quant).upper()
    if q not in QUANTS:
        raise UnsupportedError(f"unknown quant type {quant!r}; supported: {', '.join(SUPPORTED_QUANTS)}")
    return q


def check_arch(config: dict, where: str = "config.json") -> gguf.MODEL_ARCH:
    arch = config.get("model_type")
    if arch not in ARCHS:
        raise UnsupportedError(f"{where}: architecture {arch!r} is not supported for GGUF; supported: "
                               f"{', '.join(SUPPORTED_ARCHS)}")
    return ARCHS[arch]


def check_gguf_export(config: dict, where: str = "config.json") -> gguf.MODEL_ARCH:
    """check_arch, and the hyperparameters the architecture needs that llama.cpp runs as transformers does
    (converters/gguf_arch.py), before anything is written."""
    arch = check_arch(config, where)
    if arch in gguf_arch.ARCHS:
        gguf_arch.check_layout(config, hparams(config), arch, where)
    return arch


# byte offsets of the f16 scales (d, and m / dmin) inside one block of each ggml quant type
_F16_SCALES = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q2_K: (80, 82),
               Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def count_nonfinite_encoded(encoded: np.ndarray, qtype: Q) -> int:
    """NaN/Inf values in encoded data: F32/F16/BF16 values, or for block quants the values of each block
    whose f16 scale is NaN/Inf (a scale that overflowed makes its whole block NaN/Inf)."""
    if qtype == Q.F32:
        a = encoded.view(np.float32)
        return int(a.size - np.count_nonzero(np.isfinite(a)))
    if qtype == Q.F16:
        a = encoded.view(np.float16)
        return int(a.size - np.count_nonzero(np.isfinite(a)))
    if qtype == Q.BF16:
        return int(np.count_nonzero((encoded.view(np.uint16) & 0x7F80) == 0x7F80))
    if qtype in _F16_SCALES:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        blocks = encoded.view(np.uint8).reshape(-1, size)  # (blocks, bytes)
        bad = np.zeros(len(blocks), dtype=bool)
        for off in _F16_SCALES[qtype]:
            scale = blocks[:, off:off + 2].view("<u2")[:, 0]  # (blocks,) f16 bits, strided: no copy
            bad |= (scale & 0x7C00) == 0x7C00  # exponent all ones: Inf or NaN
        return int(block * np.count_nonzero(bad))
    return 0


def first_nonfinite_tensor(path) -> tuple[str, int, str] | None:
    """(tensor name, NaN/Inf values, type) of the first tensor of a GGUF file holding NaN/Inf (see
    count_nonfinite_encoded), or None. Reads the file once (memory-mapped)."""
    for t in _open_header(path).tensors:
        qtype = Q(t.ggml_type)
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.nbytes,)) if t.nbytes else \
            np.zeros(0, np.uint8)
        n = count_nonfinite_encoded(data, qtype)
        if n:
            return t.name, n, qtype.name
    return None


# --------------------------------------------------------------------------------------------- sinks

class _StreamingGGUF:
    """A GGUFWriter whose header is written up front; tensor bytes are then written at their offsets.

    plan: gguf name -> (numpy shape, ggml type) in file order. Subclasses add the metadata.
    """

    def __init__(self, out_path, arch_name: str, quant: str, types: dict[str, int] | None = None):
        self.out_path = Path(out_path)
        self.quant = check_quant(quant)
        self.file_type, self.direct_type = QUANTS[self.quant]
        self.types = types  # gguf name -> ggml type chosen by llama.cpp for this quant: encoded here, directly
        self._llama_finishes = self.direct_type is None and types is None  # a float file llama.cpp quantizes
        self._part = self.out_path.with_name(self.out_path.name + ".part")
        self._inter = self.out_path.with_name(self.out_path.name + ".unquantized.part")
        self._path = self._inter if self._llama_finishes else self._part
        self.writer = _Writer(self._path, arch_name)
        self.plan: dict[str, tuple[tuple[int, ...], Q]] = {}
        self._written: set[str] = set()
        self._offsets: dict[str, int] = {}
        self._rows_done: dict[str, tuple[int, int, int]] = {}  # in progress -> (rows, NaN/Inf, out of range)
        self._closed = False

    # -- planning
    def _tensor_type(self, gguf_name: str, shape: tuple[int, ...], source_tag: str) -> Q:
        """As convert_hf_to_gguf: 1-D tensors and norms F32; else the quant's type, F16 if rows don't fit."""
        if self.types is not None:
            if gguf_name not in self.types:
                raise InputError(f"tensor {gguf_name!r}: no type chosen by llama.cpp for {self.out_path.name}")
            return Q(self.types[gguf_name])
        if self._kept_f32(gguf_name, shape):
            return Q.F32
        qtype = self.direct_type if self.direct_type is not None else _SOURCE_TYPE.get(source_tag, _SOURCE_TYPE["F16"])[0]
        block, _ = gguf.GGML_QUANT_SIZES[qtype]
        return qtype if shape[-1] % block == 0 else Q.F16

    @staticmethod
    def _kept_f32(gguf_name: str, shape: tuple[int, ...]) -> bool:
        """1-D tensors and norms: F32 here, and left as they are by llama.cpp's quantizer."""
        return len(shape) <= 1 or gguf_name.endswith("_norm.weight")

    def _begin(self) -> None:
        """Write header, metadata and tensor infos; remember where each tensor's bytes go."""
        w = self.writer
        ft = self._intermediate_file_type() if self._llama_finishes else self.file_type
        w.add_file_type(int(ft))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        offset = 0
        for name, (shape, qtype) in self.plan.items():
            nbytes = _nbytes(shape, qtype)
            w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
            self._offsets[name] = offset
            offset += gguf.GGUFWriter.ggml_pad(nbytes, w.data_alignment)
        self._data_bytes = offset
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            fout = w.fout[0]
            w.write_padding(fout, fout.tell())
            self._data_start = fout.tell()
        except OSError as e:
            self.abort()
            raise InputError(f"{self._path}: cannot write ({e.strerror or e})") from None

    def _intermediate_file_type(self) -> FT:
        types = {q for _, q in self.plan.values() if q != Q.F32}
        for q, ft in ((Q.BF16, FT.MOSTLY_BF16), (Q.F16, FT.MOSTLY_F16)):
            if q in types:
                return ft
        return FT.ALL_F32

    # -- data
    def _write_gguf(self, gguf_name: str, x: np.ndarray) -> None:
        """Write one whole tensor (float32, its numpy shape)."""
        shape, _ = self.plan[gguf_name]
        if gguf_name in self._written:
            raise InputError(f"tensor {gguf_name!r} written twice to {self.out_path.name}")
        if tuple(x.shape) != tuple(shape):
            raise InputError(f"tensor {gguf_name!r}: shape {tuple(x.shape)} != planned {tuple(shape)}")
        rows = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)  # (R, C)
        step = max(1, _CHUNK_ELEMENTS // max(rows.shape[1], 1))  # encode a few MB at a time: bounded extra memory
        for i in range(0, rows.shape[0], step) if rows.shape[0] else [0]:
            self._write_rows(gguf_name, i, rows[i:i + step])

    def _write_rows(self, gguf_name: str, start: int, rows: np.ndarray) -> None:
        """Write rows start:start+n (float32, (n, C)) of a tensor seen as (rows, last dim); a tensor's pieces
        come in order, and its NaN/Inf check (and, for llama.cpp to quantize, its range check) is made when the
        last one is written."""
        self._check_rows(gguf_name, start, rows.shape)
        self._put_rows(gguf_name, start, rows.shape[0], *self._encode_rows(gguf_name, rows))

    def _check_rows(self, gguf_name: str, start: int, shape: tuple[int, ...]) -> None:
        """That rows start:start+n of this shape continue the tensor's pieces written so far."""
        planned, _ = self.plan[gguf_name]
        n_rows, cols = _rows_cols(planned)
        done = self._rows_done.get(gguf_name, (0, 0, 0))[0]
        if gguf_name in self._written:
            raise InputError(f"tensor {gguf_name!r} written twice to {self.out_path.name}")
        if start != done or len(shape) != 2 or shape[1] != cols or start + shape[0] > n_rows:
            raise InputError(f"tensor {gguf_name!r}: rows {start}:{start + shape[0]} of shape {tuple(shape)} "
                             f"do not continue rows 0:{done} of planned {tuple(planned)}")

    def _encode_rows(self, gguf_name: str, rows: np.ndarray) -> tuple[np.ndarray, int, int]:
        """(encoded rows (n, bytes) uint8, NaN/Inf values in them, values beyond what llama.cpp's quantizer
        takes when it finishes the file): nothing written, no state touched, so pieces can be encoded on several
        threads (llama.cpp's encoder releases the GIL)."""
        shape, qtype = self.plan[gguf_name]
        if rows.ndim != 2 or rows.shape[1] != _rows_cols(shape)[1]:
            raise InputError(f"tensor {gguf_name!r}: rows of shape {tuple(rows.shape)} do not fit planned "
                             f"{tuple(shape)}")
        encoded = quantize_rows(np.ascontiguousarray(rows, dtype=np.float32), qtype)  # (n, bytes) uint8
        over = 0
        if self.direct_type is None and not self._kept_f32(gguf_name, shape):
            with np.errstate(invalid="ignore"):
                over = int(np.count_nonzero(np.abs(rows) > QUANT_INPUT_MAX))  # (NaN: not counted here)
        return encoded, count_nonfinite_encoded(encoded, qtype), over

    def _put_rows(self, gguf_name: str, start: int, n: int, encoded: np.ndarray, bad: int, over: int) -> None:
        """Write encoded rows start:start+n at their place in the file (pieces of a tensor in order)."""
        shape, qtype = self.plan[gguf_name]
        n_rows, cols = _rows_cols(shape)
        self._check_rows(gguf_name, start, (n, cols))
        done, seen_bad, seen_over = self._rows_done.get(gguf_name, (0, 0, 0))
        fout = self.writer.fout[0]
        fout.seek(self._data_start + self._offsets[gguf_name] + start * _nbytes((cols,), qtype))
        try:
            fout.write(np.ascontiguousarray(encoded).data)  # (numpy's tofile costs ~10 us more per call)
        except OSError as e:  # e.g. a full disk: say which file
            e.filename = e.filename or str(self.out_path)
            raise
        done, bad, over = done + n, seen_bad + bad, seen_over + over
        self._rows_done[gguf_name] = (done, bad, over)
        if done < n_rows:
            return
        if bad:
            raise NumericError(f"tensor {gguf_name!r}: {bad} values are NaN/Inf as {qtype.name} in {self.out_path.name} "
                               f"(out of that type's range: use a smaller mu, or quant F32)")
        if over:
            raise NumericError(f"tensor {gguf_name!r}: {over} values beyond +-{QUANT_INPUT_MAX:g} cannot be quantized "
                               f"to {self.quant} in {self.out_path.name} (its block scales are float16: use a smaller "
                               f"mu, or quant F32)")
        self._written.add(gguf_name)
        del self._rows_done[gguf_name]

    def close(self) -> Path:
        """Finish the file (quantize with llama.cpp if asked) and move it to its final name."""
        if self._closed:
            return self.out_path
        missing = [n for n in self.plan if n not in self._written]
        if missing:
            self.abort()
            raise InputError(f"{self.out_path.name}: {len(missing)} tensor(s) never written, first {missing[0]!r}")
        fout = self.writer.fout[0]
        fout.seek(self._data_start + self._data_bytes)
        fout.truncate()
        self.writer.close()

        def finish() -> None:
            if self._llama_finishes:
                quantize_checked(self._inter, self._part, self.file_type, self.out_path.name,
                                 "out of that type's range: use a smaller mu, or quant F32")
                self._inter.unlink()

        return _commit(self, finish)

    def abort(self) -> None:
        """Drop everything written so far (partial files removed; the final name is never created)."""
        self._closed = True
        self.writer.close()
        for p in (self._part, self._inter):
            p.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        else:
            self.close()
        return False


class GGUFSink(_StreamingGGUF):
    """Streaming HF -> GGUF writer for one model.

    config: the HF config.json dict; tensors: HF name -> (numpy shape, source dtype tag "F32"|"F16"|"BF16") in
    checkpoint order; tokenizer_dir: the folder with tokenizer.json / tokenizer.model / tokenizer_config.json;
    quant: one of SUPPORTED_QUANTS. `write(hf_name, f32_array)` once per tensor, in any order; names that GGUF
    does not keep (lm_head of tied embeddings, rotary inv_freq) are accepted and dropped. `close() -> Path`.
    """

    def __init__(self, out_path, *, config: dict, tensors: dict, tokenizer_dir, quant: str = "F32",
                 name: str | None = None):
        self.config = config
        self.model_arch = check_arch(config)
        super().__init__(out_path, gguf.MODEL_ARCH_NAMES[self.model_arch], quant)
        self.hp = hparams(config)
        self.tensor_map = gguf.get_tensor_name_map(self.model_arch, self.hp["n_layer"])
        self.names: dict[str, str | None] = {}  # HF name -> GGUF name (None: dropped)
        try:
            if self.model_arch in gguf_arch.ARCHS:
                gguf_arch.check_layout(config, self.hp, self.model_arch)
            extra = self._plan(tensors)
            add_hparams(self.writer, self.hp, self.model_arch, name, config)
            read_tokenizer(tokenizer_dir, self.hp["n_vocab"], config.get("model_type")).add_to(self.writer)
        except BaseException:
            self.abort()
            raise
        self._begin()
        for gname, x in extra.items():
            self._write_gguf(gname, x)

    def _plan(self, tensors: dict) -> dict[str, np.ndarray]:
        """Map every HF tensor to its GGUF name and type; returns the extra tensors GGUF needs (rope_freqs, Phi-3's
        rope_factors_long / _short)."""
        extra = gguf_arch.extra_tensors(self.config, self.hp, self.model_arch)
        freqs = llama3_rope_factors(self.config, self.hp)
        if freqs is not None:
            extra[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = freqs
        for gname, x in extra.items():
            self.plan[gname] = (x.shape, Q.F32)
        for hf_name, (shape, tag) in tensors.items():
            gname = self._gguf_name(hf_name)
            self.names[hf_name] = gname
            if gname is not None:
                self.plan[gname] = (tuple(int(d) for d in shape), self._tensor_type(gname, tuple(shape), tag))
        if not any(n.startswith("token_embd") for n in self.plan):
            raise InputError("checkpoint has no token embedding tensor (model.embed_tokens.weight)")
        return extra

    def _gguf_name(self, hf_name: str) -> str | None:
        if hf_name.endswith(_SKIP_SUFFIXES) or (hf_name == "lm_head.weight" and self.hp["tied"]):
            return None
        gname = self.tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise UnsupportedError(
                f"tensor {hf_name!r} has no GGUF name for architecture {self.config.get('model_type')}")
        return gname

    def write(self, hf_name: str, x: np.ndarray) -> None:
        """Write one tensor given by its HF name as a float32 array of its HF shape."""
        if hf_name not in self.names:
            raise InputError(f"tensor {hf_name!r} was not announced to the GGUF writer for {self.out_path.name}")
        gname = self.names[hf_name]
        if gname is None:
            return
        if self.model_arch == gguf.MODEL_ARCH.LLAMA:
            x = self._llama_permute(hf_name, x)
        self._write_gguf(gname, gguf_arch.tensor_for_gguf(self.model_arch, hf_name, x))

    def _llama_permute(self, hf_name: str, x: np.ndarray) -> np.ndarray:
        """q/k rows reordered from HF's rotate-half layout to llama.cpp's interleaved rope (LlamaModel.permute)."""
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return permute_qk(x, self.hp["n_head"])
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return permute_qk(x, self.hp["n_head_kv"])
        return x


class GGUFCopySink(_StreamingGGUF):
    """Streaming GGUF -> GGUF writer: all metadata copied from `source` (a .gguf path), tensors given in
    GGUF naming and numpy shape order (as GGUFReader-based readers return them, reversed ggml dims):
    tensors: gguf name -> (numpy shape, source tag); `write(gguf_name, f32_array)`; quant as GGUFSink."""

    def __init__(self, out_path, *, source, tensors: dict, quant: str = "F32", header: Header | None = None,
                 types: dict[str, int] | None = None):
        header = header or _open_header(source)
        arch = header.meta.get(gguf.Keys.General.ARCHITECTURE)
        if not isinstance(arch, str) or not arch:
            raise InputError(f"{source}: no general.architecture in GGUF metadata")
        super().__init__(out_path, arch, quant, types)
        # A tensor the source keeps in F32 among tensors of lower types was kept so by the converter that wrote
        # it (e.g. the ssm_* tensors of Mamba-like models, which llama.cpp's ops take in F32 only): it stays F32.
        kept = {n for n, (_, tag) in tensors.items() if tag == "F32"} if any(
            tag != "F32" for _, tag in tensors.values()) else set()
        try:
            copy_metadata(header, self.writer)
            for name, (shape, tag) in tensors.items():
                qtype = Q.F32 if name in kept and types is None else self._tensor_type(name, tuple(shape), tag)
                self.plan[name] = (tuple(int(d) for d in shape), qtype)
        except BaseException:
            self.abort()
            raise
        self._begin()

    def write(self, gguf_name: str, x: np.ndarray) -> None:
        if gguf_name not in self.plan:
            raise InputError(f"tensor {gguf_name!r} was not announced to the GGUF writer for {self.out_path.name}")
        self._write_gguf(gguf_name, x)

    def write_rows(self, gguf_name: str, start: int, rows: np.ndarray) -> None:
        """Rows start:start+n of a tensor seen as (rows, last dim), float32 (n, C); pieces of one tensor in
        order (iter_expert_rows gives them so). Bytes are those write() gives for the whole tensor."""
        if gguf_name not in self.plan:
            raise InputError(f"tensor {gguf_name!r} was not announced to the GGUF writer for {self.out_path.name}")
        self._write_rows(gguf_name, start, rows)

    def encode_rows(self, gguf_name: str, rows: np.ndarray) -> tuple[np.ndarray, int, int]:
        """write_rows in two halves: encode (thread-safe, nothing written) here, then put_rows in order."""
        if gguf_name not in self.plan:
            raise InputError(f"tensor {gguf_name!r} was not announced to the GGUF writer for {self.out_path.name}")
        return self._encode_rows(gguf_name, rows)

    def stores_as(self, gguf_name: str, stored_type: str) -> bool:
        """Whether this tensor is written in the type named (a ggml type name, e.g. Q8_0): its stored rows can
        then be copied as they are (copy_rows) instead of dequantized and encoded again."""
        return gguf_name in self.plan and self.plan[gguf_name][1].name == stored_type

    def copy_rows(self, gguf_name: str, stored: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, int, int]:
        """encode_rows for rows already stored in this tensor's type: the stored bytes (n, bytes per row) as
        they are; rows (n, C) float32, their values, for the range check of a file llama.cpp finishes."""
        shape, qtype = self.plan[gguf_name]
        data = np.ascontiguousarray(stored).view(np.uint8).reshape(stored.shape[0], -1)  # (n, bytes)
        if data.shape[1] != _nbytes((_rows_cols(shape)[1],), qtype) or data.shape[0] != rows.shape[0]:
            raise InputError(f"tensor {gguf_name!r}: stored rows of {data.shape[1]} bytes do not fit planned "
                             f"{tuple(shape)} as {qtype.name}")
        over = 0
        if self.direct_type is None and not self._kept_f32(gguf_name, shape):
            with np.errstate(invalid="ignore"):
                over = int(np.count_nonzero(np.abs(rows) > QUANT_INPUT_MAX))
        return data, 0, over

    def put_rows(self, gguf_name: str, start: int, encoded: tuple[np.ndarray, int, int]) -> None:
        """Write what encode_rows gave for rows start:start+n; the same checks and bytes as write_rows."""
        if gguf_name not in self.plan:
            raise InputError(f"tensor {gguf_name!r} was not announced to the GGUF writer for {self.out_path.name}")
        self._put_rows(gguf_name, start, encoded[0].shape[0], *encoded)


class GGUFRequantizeSink:
    """A GGUF input model, unchanged, at a quant llama.cpp makes (K-quants, Q4_0): llama-quantize's own job,
    done by llama_model_quantize straight from the input file when the sink closes (the input's blocks
    dequantized by llama.cpp, tensors already of a target type copied), without the float intermediate file
    the other sinks write. For the amateur and inferior (and the expert at mu = 0). Takes no tensors."""

    def __init__(self, out_path, *, source, quant: str):
        self.out_path, self.source = Path(out_path), Path(source)
        self.quant = check_quant(quant)
        self.file_type, direct = QUANTS[self.quant]
        if direct is not None:
            raise ParameterError(f"quant {quant} is written directly, not requantized by llama.cpp")
        self._part = self.out_path.with_name(self.out_path.name + ".part")
        self._closed = False

    def close(self) -> Path:
        if self._closed:
            return self.out_path
        return _commit(self, lambda: quantize_checked(self.source, self._part, self.file_type, self.out_path.name,
                                                      f"from {self.source.name}", allow_requantize=True))

    def abort(self) -> None:
        self._closed = True
        self._part.unlink(missing_ok=True)

    def types(self) -> dict[str, int]:
        """gguf name -> the ggml type llama.cpp chose for each tensor of the written file (after close())."""
        return {t.name: int(t.ggml_type) for t in read_header(self.out_path).tensors}


def _commit(sink, finish) -> Path:
    """finish() (what makes sink._part whole), then sink._part renamed to sink.out_path; on any error the
    sink is aborted (nothing under the final name) and the error raised."""
    try:
        finish()
        os.replace(sink._part, sink.out_path)
    except BaseException:
        sink.abort()
        raise
    sink._closed = True
    return sink.out_path


def gguf_sink_for(checkpoint, out_path, quant: str, types: dict[str, int] | None = None):
    """The right sink for a Checkpoint (converters.checkpoint): GGUFSink for HF folders, GGUFCopySink for GGUF
    (types: llama.cpp's per-tensor choice for the quant, to encode directly; GGUF inputs only)."""
    tensors = {n: (t.shape, t.dtype) for n, t in checkpoint.tensors.items()}
    if checkpoint.format == "gguf":
        return GGUFCopySink(out_path, source=checkpoint.path, tensors=tensors, quant=quant, header=checkpoint.header,
                            types=types)
    return GGUFSink(out_path, config=checkpoint.config, tensors=tensors, tokenizer_dir=checkpoint.tokenizer_dir,
                    quant=quant, name=Path(checkpoint.path).name)


# ------------------------------------------------------------------------------------ convenience

def hf_to_gguf(hf_dir, out_path, quant: str = "F32") -> Path:
    """Convert one HF folder (config.json, safetensors single or sharded, tokenizer) to one GGUF file (a
    multimodal checkpoint's text model: converters/multimodal.py)."""
    from .checkpoint import HFCheckpoint

    with HFCheckpoint(Path(hf_dir)) as ckpt:
        tensors = {n: (t.shape, t.dtype) for n, t in ckpt.tensors.items()}
        with GGUFSink(out_path, config=ckpt.config, tensors=tensors, tokenizer_dir=ckpt.tokenizer_dir, quant=quant,
                      name=Path(hf_dir).name) as sink:
            for n in tensors:
                sink.write(n, ckpt.read_f32(n))
    return Path(out_path)


def read_config(hf_dir: Path) -> dict:
    import json

    path = Path(hf_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except (RecursionError, UnicodeDecodeError):
        raise InputError(f"{path}: invalid JSON (nested too deeply, or not UTF-8)") from None


# ----------------------------------------------------------------------------------- hyperparameters

def _need(config: dict, *keys: str):
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    raise InputError(f"config.json missing {keys[0]}")


def hparams(config: dict) -> dict:
    """The hyperparameters llama.cpp needs, from an HF config.json dict (one-line error for a missing field)."""
    n_embd = int(_need(config, "hidden_size", "n_embd"))
    n_head = int(_need(config, "num_attention_heads", "n_head"))
    rope, theta_swa = rope_parameters(config)
    if n_embd % n_head and config.get("head_dim") is None:
        raise InputError(f"config.json hidden_size {n_embd} is not a multiple of num_attention_heads {n_head}")
    return {
        "n_vocab": int(_need(config, "vocab_size")),
        "n_ctx": int(_need(config, "max_position_embeddings", "n_positions", "n_ctx")),
        "n_embd": n_embd,
        "n_layer": int(_need(config, "num_hidden_layers", "n_layer")),
        "n_ff": int(_need(config, "intermediate_size", "n_inner")),
        "n_head": n_head,
        "n_head_kv": int(config.get("num_key_value_heads") or n_head),
        "head_dim": int(config.get("head_dim") or n_embd // n_head),
        "explicit_head_dim": config.get("head_dim") is not None,
        "rope_theta": config.get("rope_theta", rope.get("rope_theta")),
        "rope_theta_swa": theta_swa,  # Gemma 3's local layers
        "rope": rope if rope.get("rope_type") not in (None, "default") else {},
        "rope_all": rope,
        "rms_eps": float(_need(config, "rms_norm_eps")),
        "tied": bool(config.get("tie_word_embeddings", False)),
    }


def rope_parameters(config: dict) -> tuple[dict, float | None]:
    """(the rope parameters of the global layers: rope_theta, rope_type and its scaling fields, the rope theta of
    sliding-window layers or None). transformers >= 5 keeps them in rope_parameters, per layer type for Gemma 3
    ({"full_attention": ..., "sliding_attention": ...}); older configs in rope_theta, rope_scaling and
    rope_local_base_freq."""
    params = dict(config.get("rope_parameters") or {})
    theta_swa = config.get("rope_local_base_freq")
    if "full_attention" in params or "sliding_attention" in params:
        theta_swa = (params.get("sliding_attention") or {}).get("rope_theta", theta_swa)
        params = dict(params.get("full_attention") or {})
    params.update(config.get("rope_scaling") or {})
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    return params, theta_swa


def add_hparams(w: gguf.GGUFWriter, hp: dict, arch: gguf.MODEL_ARCH, name: str | None,
                config: dict | None = None) -> None:
    """The architecture keys, as convert_hf_to_gguf's TextModel / LlamaModel / Qwen2Model write them (Gemma 2/3
    and Phi-3, from the config: converters/gguf_arch.py)."""
    if name:
        w.add_name(name)
    if arch in gguf_arch.ARCHS:
        gguf_arch.add_arch_hparams(w, config or {}, hp, arch)
        return
    gguf_arch.add_shape_hparams(w, hp)
    if hp["rope_theta"] is not None:
        w.add_rope_freq_base(float(hp["rope_theta"]))
    w.add_layer_norm_rms_eps(hp["rms_eps"])
    if hp["explicit_head_dim"]:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    if arch == gguf.MODEL_ARCH.LLAMA:
        w.add_vocab_size(hp["n_vocab"])
        w.add_rope_dimension_count(hp["head_dim"])
    rope = hp["rope"]
    kind = rope.get("rope_type")
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind not in (None, "llama3"):
        raise UnsupportedError(f"config.json rope_scaling type {kind!r} is not supported (linear, yarn, llama3)")


def llama3_rope_factors(config: dict, hp: dict) -> np.ndarray | None:
    """The rope_freqs tensor that llama.cpp uses for Llama 3.1+ rope scaling (as convert_hf_to_gguf makes it)."""
    rope = hp["rope"]
    if rope.get("rope_type") != "llama3":
        return None
    base, dim = float(hp["rope_theta"] or 10000.0), hp["head_dim"]
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)  # (head_dim/2,)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """(n_head*head_dim, ...) rows: per head, [x0..x{d/2-1}, y0..] -> [x0, y0, x1, y1, ...]."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# ------------------------------------------------------------------------------------ GGUF helpers

def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, C) of a tensor seen as rows of its last dim; a 1-D (or 0-D) tensor is one row."""
    n = math.prod(shape)
    cols = shape[-1] if len(shape) > 1 else n
    return (n // cols if cols else 0), cols


def _nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64))
    return n // block * type_size


def _open_header(path) -> Header:
    try:
        return read_header(path)
    except CheckpointError as e:
        raise InputError(str(e)) from None


# keys the writer sets itself (header counts, file type, quant version, alignment)
_OWN_KEYS = {gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE,
             gguf.Keys.General.QUANTIZATION_VERSION, gguf.Keys.General.ALIGNMENT}


def copy_metadata(header: Header, w: "_Writer") -> None:
    """Every key/value of the source GGUF except the ones the writer owns, as their stored bytes (which are
    what gguf-py packs from the decoded values: tested)."""
    keys = [k for k in header.types if k not in _OWN_KEYS]
    for key, stored in header.stored(keys).items():
        vtype, sub = header.types[key]
        w.add_key_value(key, _Stored(stored), gguf.GGUFValueType(vtype),
                        sub_type=gguf.GGUFValueType(sub) if sub is not None else None)


class _Stored(bytes):
    """A metadata value as a GGUF file stores it: type field and payload."""


class _Writer(gguf.GGUFWriter):
    """gguf-py's writer; a _Stored value is written as is, not packed again element by element (a real
    vocabulary and its merges are ~300k values: 0.3 s per file in gguf-py's packer). This hooks the packer
    that gguf-py's write_kv_data_to_file calls once per value (test_copied_metadata_is_what_gguf_py_packs
    fails if a gguf-py release stops doing so)."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if isinstance(val, _Stored) and add_vtype:
            return bytes(val)
        return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)


def quantize_checked(src: Path, dst: Path, file_type: FT, name: str, why: str, allow_requantize: bool = False) -> None:
    """llama_quantize, then NumericError naming the first tensor whose blocks came out NaN/Inf (llama.cpp's
    float16 block scales can overflow); name: the output's name in the message, why: its explanation."""
    llama_quantize(src, dst, file_type, allow_requantize=allow_requantize)
    bad = first_nonfinite_tensor(dst)
    if bad is not None:
        raise NumericError(f"tensor {bad[0]!r}: {bad[1]} values are NaN/Inf as {bad[2]} in {name} ({why})")


def llama_quantize(src: Path, dst: Path, file_type: FT, nthread: int = 0, allow_requantize: bool = False) -> None:
    """llama.cpp's quantizer (llama_model_quantize) from src GGUF to dst GGUF; allow_requantize takes a
    quantized src (its blocks dequantized by llama.cpp, tensors already of the target type copied)."""
    try:
        import llama_cpp
    except ImportError as e:
        raise BackendError(f"quantizing {dst.name} needs llama-cpp-python ({e})") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type)
    params.nthread = nthread or (os.cpu_count() or 1)
    params.allow_requantize = allow_requantize
    from llama_cpp._utils import suppress_stdout_stderr

    log = logging.getLogger("llama-cpp-python")  # gates llama.cpp's log callback (llama_cpp._logger)
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        with suppress_stdout_stderr(disable=False):  # per-tensor fallback notes go straight to stderr
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    finally:
        log.setLevel(old)
    if rc != 0:
        raise BackendError(f"llama.cpp failed to quantize {src.name} to {file_type.name} (code {rc})")
