"""llama.cpp through llama-cpp-python: one GGUF model, one context, one KV sequence.

The `Llama` class loads the model and makes the context (n_ctx, n_threads, n_gpu_layers for CUDA/Metal
offload, logits_all=False); decoding then goes through the low-level API: one `llama_decode` per prefill chunk
or step, the last position's logits read with `llama_get_logits_ith(ctx, -1)` as a numpy view (no copy),
KV truncation with `llama_memory_seq_rm`. The KV cache is f16 as llama.cpp's default (kv_type="f32" makes
logits agree with an f32 MLX model to ~1e-5 instead of ~1e-3).
"""

from __future__ import annotations

import ctypes
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import BackendError, InputError, ParameterError, UnsupportedError
from . import cpu_kernels
from .llamacpp_threads import share_context_cores
from .base import BaseBackend, end_of_turn_ids

# KV cache types: ggml type, and whether llama.cpp needs flash attention for it (a quantized V cache does).
# f16 is llama.cpp's default, f32 for exact checks, q8_0 for half the memory.
KV_TYPES = {"f32": (0, False), "f16": (1, False), "q8_0": (8, True)}


_LOG = {"callback": None, "last": 0, "buffers": []}
_BUFFER_LINE = re.compile(r"(\S+) model buffer size")  # "load_tensors:   CPU_REPACK model buffer size = ..."


def quiet_llama_logs(llama_cpp) -> None:
    """Keep llama.cpp's errors on stderr, drop its info and warnings (e.g. "n_ctx_seq > n_ctx_train"), which
    llama-cpp-python's own filter lets through (its level table predates ggml's DEBUG level). The names of the
    buffers a model's weights are loaded into are kept (`weight_buffers`: CPU_Mapped, CPU_REPACK, AMX, CUDA0...)."""
    if _LOG["callback"] is not None:
        return

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        level = _LOG["last"] if level == 5 else level  # 5 = continuation of the previous message
        _LOG["last"] = level
        if level == 4:  # GGML_LOG_LEVEL_ERROR
            sys.stderr.write(text.decode("utf-8", errors="replace"))
        elif b"model buffer size" in text:
            m = _BUFFER_LINE.search(text.decode("utf-8", errors="replace"))
            if m:
                _LOG["buffers"].append(m.group(1))

    _LOG["callback"] = callback  # keep a reference: llama.cpp holds only the C pointer
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


class LlamaCppBackend(BaseBackend):
    name = "llama.cpp"
    concurrent = True  # llama_decode releases the GIL; each backend has its own context

    def __init__(self, path, n_ctx: int = 2048, n_threads: int | None = None, n_gpu_layers: int = 0,
                 n_batch: int = 512, kv_type: str = "f16", batch_steps: str = "auto"):
        from .multiseq import StepGrouping

        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: GGUF model file not found")
        import llama_cpp

        if kv_type not in KV_TYPES:
            raise ParameterError(f"kv_type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
        self._lib = llama_cpp
        quiet_llama_logs(llama_cpp)
        self.cpu_kernels = cpu_kernels.decide()  # extra buffer types (AMX, repack) only where they run here
        _LOG["buffers"].clear()
        try:
            self._llm = cpu_kernels.open_llama(
                path, self.cpu_kernels, n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_threads=n_threads,
                n_threads_batch=n_threads, n_gpu_layers=n_gpu_layers, logits_all=False, verbose=False,
                type_k=KV_TYPES[kv_type][0], type_v=KV_TYPES[kv_type][0], flash_attn=KV_TYPES[kv_type][1])
        except (ValueError, RuntimeError, OSError) as e:
            hint = "; a q8_0 KV cache needs attention head sizes divisible by 32" if kv_type == "q8_0" else ""
            raise BackendError(f"{path}: llama.cpp cannot load the model ({' '.join(str(e).split())}){hint}") \
                from None
        self.weight_buffers = tuple(dict.fromkeys(_LOG["buffers"]))  # where the weights live, e.g. CPU_REPACK
        super().__init__(path, self._llm.n_ctx())
        self._ctx = self._llm._ctx.ctx
        self._batch = self._llm._batch
        self._n_batch = self._llm.n_batch
        self._vocab = self._llm._model.vocab
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._piece = ctypes.create_string_buffer(256)
        self._views: dict[int, np.ndarray] = {}
        # llama_get_logits_ith returning a plain address (no ctypes pointer object to cast per token)
        self._logits_addr = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32)(
            ("llama_get_logits_ith", llama_cpp.llama_cpp._lib))
        self._texts: list[str] | None = None
        self.n_threads_given = n_threads
        self.threads = self._threads_at_load = (self._llm.n_threads, self._llm.n_threads_batch)  # (decode, batch)
        self.on_cpu = n_gpu_layers == 0 or not llama_cpp.llama_supports_gpu_offload()
        # batched forms (multiseq) decode a step's tokens in one call or one each, by measurement
        # (backends/multiseq.py); what they measured is kept here for the next one
        self.batch_steps = StepGrouping(batch_steps)
        self._read_metadata()

    def _read_metadata(self) -> None:
        lib, vocab, meta = self._lib, self._vocab, self._llm.metadata
        bos = int(lib.llama_vocab_bos(vocab))
        self.bos_id = bos if bos >= 0 else None
        self.add_bos = bool(lib.llama_vocab_get_add_bos(vocab)) and self.bos_id is not None
        eos = int(lib.llama_vocab_eos(vocab))
        eog = {i for i in range(self.vocab_size) if lib.llama_vocab_is_eog(vocab, i)}
        eog |= end_of_turn_ids(self._single_special_id)
        if eos >= 0:
            eog.add(eos)
        self.eos_ids = frozenset(eog)
        self.chat_template = meta.get("tokenizer.chat_template")
        self.bos_token = self._text(self.bos_id) if self.bos_id is not None else None
        self.eos_token = self._text(eos) if eos >= 0 else None

    def _text(self, i: int) -> str:
        return self._lib.llama_vocab_get_text(self._vocab, i).decode("utf-8", errors="replace")

    def _single_special_id(self, text: str) -> int | None:
        ids = self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return ids[0] if len(ids) == 1 and self._lib.llama_vocab_is_control(self._vocab, ids[0]) else None

    # -- tokens ------------------------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = True, add_bos: bool | None = None) -> list[int]:
        """As the model's HF tokenizer does: add_bos=None follows the GGUF's add_bos flag."""
        ids = self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos is not False, special=special)
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for; control tokens (BOS, EOS, chat markers) give b""."""
        n = self._lib.llama_token_to_piece(self._vocab, token_id, self._piece, len(self._piece), 0, False)
        if n < 0:  # buffer too small: grow and retry
            self._piece = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token_id, self._piece, len(self._piece), 0, False)
        return self._piece.raw[:n]

    def detokenize(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.token_bytes(i) for i in ids)

    def token_texts(self) -> list[str]:
        if self._texts is None:
            self._texts = [self._text(i) for i in range(self.vocab_size)]
        return self._texts

    # -- threads -----------------------------------------------------------------------------------
    def share_cores(self, parts: int) -> None:
        share_context_cores(self, parts)

    # -- batched form ------------------------------------------------------------------------------
    def multiseq(self, n_slots: int, n_ctx: int | None = None):
        """This model with n_slots KV sequences decoded together (backends/llamacpp_batch.py): the same loaded
        weights, this context's settings (threads, KV type, n_batch) and adapters; n_ctx per slot defaults
        to this context's."""
        from .llamacpp_batch import MultiSeqLlamaCpp

        params = type(self._llm.context_params).from_buffer_copy(self._llm.context_params)
        return MultiSeqLlamaCpp(self._lib, self._llm._model.model, params, n_slots=n_slots,
                                n_ctx=n_ctx or self.n_ctx, path=self.path, vocab_size=self.vocab_size,
                                adapters=self._adapters(), n_threads_given=self.n_threads_given,
                                steps=self.batch_steps)

    def _adapters(self) -> list:
        """(llama_adapter_lora pointer, scale) pairs set on this context: none for a plain model."""
        return []

    # -- forward -----------------------------------------------------------------------------------
    def _forward(self, ids: list[int]) -> np.ndarray:
        self._decode(ids)
        return self._logits_view()

    def _forward_rows(self, ids: list[int], rows: np.ndarray) -> np.ndarray:
        """Rows of the whole logits vector (llama.cpp computes all of them for an output position); no rows:
        no output position at all, so llama.cpp skips its output layer (SmolLM2 Q8_0, 2 threads: a step
        12.9 -> 11.0 ms)."""
        if rows.size == 0:
            self._decode(ids, output=False)
            return np.zeros(0, dtype=np.float32)
        return self._forward(ids)[rows]

    def _decode(self, ids: list[int], output: bool = True) -> None:
        """llama_decode ids in n_batch chunks after the cached positions; the last one an output position
        (logits) unless output is False."""
        n_past = self.n_past
        for i in range(0, len(ids), self._n_batch):
            chunk = ids[i:i + self._n_batch]
            self._batch.set_batch(chunk, n_past=n_past + i, logits_all=False)
            if not output:
                self._batch.batch.logits[len(chunk) - 1] = 0
            rc = self._lib.llama_decode(self._ctx, self._batch.batch)
            if rc != 0:
                self._trim(n_past)
                raise BackendError(f"{self.path}: llama_decode failed with code {rc}")

    def _logits_view(self) -> np.ndarray:
        """The last position's logits (V,) float32: a numpy view of llama.cpp's buffer, valid until the next
        decode (one view per buffer address, made once)."""
        addr = self._logits_addr(self._ctx, -1)
        if addr is None:
            raise BackendError(f"{self.path}: llama.cpp returned no logits")
        view = self._views.get(addr)
        if view is None:
            view = np.frombuffer((ctypes.c_float * self.vocab_size).from_address(addr), dtype=np.float32)
            self._views[addr] = view
        return view

    def _trim(self, n: int) -> None:
        if not self._lib.llama_memory_seq_rm(self._mem, -1, n, -1):
            raise UnsupportedError(f"{self.path}: this model's cache cannot drop positions (recurrent model?)")
        self._llm.n_tokens = n

    def close(self) -> None:
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None:
            llm.close()

