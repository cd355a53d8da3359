"""llama.cpp with one base model shared by the roles, each role its own context with LoRA adapters.

A shared-base bundle (converters/lora.py) holds one base GGUF and two GGUF LoRA adapters. The base is
loaded once (one llama_model, weights memory-mapped once); each role gets its own llama_context (own KV
cache) over that model, with adapters attached at run time with a scale each:

    expert   = base + finetuned x (1 + mu) + inferior x (-mu)      (= finetuned + mu * (finetuned - inferior))
    amateur  = base + finetuned x 1
    inferior = base + inferior x 1                                   (for eval's CD-only row)

llama.cpp computes W x + sum_k scale_k * (alpha_k / r_k) * B_k (A_k x) for every adapted matmul
(`llama_set_adapters_lora`), so the roles equal the merged-weights models up to float error.

    shared = SharedBase("bundle/gguf/base-Q8_0.gguf", n_ctx=2048)
    expert = shared.role([(ft_path, 1.5), (inf_path, -0.5)])
    amateur = shared.role([(ft_path, 1.0)])
    ...                           # both are Backends (backends/base.py); the decoding loop runs unchanged
    expert.close(); amateur.close()   # the model is freed with the last role

or, for a bundle's roles: `open_roles(base, per_role, roles=("expert", "amateur"), n_ctx=...)` with
(base, per_role) = converters.lora.shared_base_roles(bundle, quant).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import BackendError, InputError
from .base import CachedTokens, Counters
from .llamacpp import LlamaCppBackend
from .llamacpp_batch import set_lora_adapters
from .multiseq import StepGrouping


class SharedBase:
    """One base GGUF loaded once; LoRA adapters loaded once each against it; roles made on demand."""

    def __init__(self, path, n_ctx: int = 2048, n_threads: int | None = None, n_gpu_layers: int = 0,
                 n_batch: int = 512, kv_type: str = "f16", batch_steps: str = "auto"):
        # The model and a first context, loaded by the plain backend (the first role uses that context).
        self.owner = LlamaCppBackend(path, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                                     n_batch=n_batch, kv_type=kv_type, batch_steps=batch_steps)
        self.path, self.llm, self._lib = self.owner.path, self.owner._llm, self.owner._lib
        self._adapters: dict[Path, object] = {}
        self._first_context_free = True
        self._roles = 0
        self._closed = False

    def adapter(self, path) -> object:
        """The llama_adapter_lora pointer of a GGUF LoRA file, loaded once (never NULL)."""
        path = Path(path)
        if path not in self._adapters:
            if not path.is_file():
                raise InputError(f"{path}: GGUF LoRA adapter file not found")
            ptr = self._lib.llama_adapter_lora_init(self.llm._model.model, str(path).encode("utf-8"))
            if not ptr:  # NULL: llama.cpp logged why (arch mismatch, shapes, not an adapter)
                raise BackendError(f"{path}: llama.cpp cannot load this LoRA adapter for base {self.path.name} "
                                   "(not a GGUF LoRA file, or made for another architecture/shape)")
            self._adapters[path] = ptr
        return self._adapters[path]

    def role(self, adapters: Sequence[tuple[object, float]], label: str | None = None) -> "LoraRoleBackend":
        """A Backend over the shared model with its own context and KV cache and these (path, scale) adapters."""
        if self._closed:
            raise BackendError(f"{self.path}: shared base model already closed")
        pointers = [(self.adapter(p), float(s)) for p, s in adapters if float(s) != 0.0]
        if self._first_context_free:
            ctx, batch = None, None  # the owner's own context
        else:
            ctx, batch = self._new_context()
        backend = LoraRoleBackend.over(self, ctx, batch, pointers, label)
        backend.role_spec = (list(adapters), label)  # what twin() makes again
        self._first_context_free = False
        self._roles += 1
        return backend

    def _new_context(self):
        from llama_cpp import _internals

        llm = self.llm
        try:
            ctx = _internals.LlamaContext(model=llm._model, params=llm.context_params, verbose=False)
            batch = _internals.LlamaBatch(n_tokens=llm.n_batch, embd=0, n_seq_max=1, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise BackendError(f"{self.path}: llama.cpp cannot make a context ({' '.join(str(e).split())})") from None
        return ctx, batch

    def _release(self) -> None:
        self._roles -= 1
        if self._roles <= 0:
            self.close()

    def close(self) -> None:
        """Free the model (its contexts and adapters go with it)."""
        if not self._closed:
            self._closed = True
            self._adapters.clear()
            self.owner.close()


class LoraRoleBackend(LlamaCppBackend):
    """One role of a shared-base bundle: the plain llama.cpp backend (tokenizer, metadata, forward pass) on its
    own context of the shared model, with LoRA adapters set on that context.

    Made by copying the shared base's loaded LlamaCppBackend and swapping its per-context state, so that it
    follows whatever that backend keeps about the model; _PER_CONTEXT lists the state that is per context.
    """

    _PER_CONTEXT = ("_ctx", "_batch", "_mem", "_views", "_held", "counters", "batch_steps")  # swapped in over()

    @classmethod
    def over(cls, shared: SharedBase, ctx_obj, batch_obj, adapters: list[tuple[object, float]],
             label: str | None = None) -> "LoraRoleBackend":
        self = cls.__new__(cls)
        self.__dict__.update(shared.owner.__dict__)
        self._shared, self._ctx_obj, self._batch_obj = shared, ctx_obj, batch_obj
        if ctx_obj is not None:
            self._ctx, self._batch = ctx_obj.ctx, batch_obj
            self._mem = self._lib.llama_get_memory(self._ctx)
        if label is not None:
            self.path = shared.path.with_name(f"{shared.path.name}+{label}")
        self._views, self._held, self.counters = {}, CachedTokens(self.path, self.n_ctx), Counters()
        self.batch_steps = StepGrouping(shared.owner.batch_steps.mode)  # its own timings (its own adapters)
        self.adapters = [s for _, s in adapters]  # scales, for display
        self._adapter_ptrs = list(adapters)
        set_lora_adapters(self._lib, self._ctx, adapters, self.path)
        return self

    def twin(self) -> "LoraRoleBackend":
        """Another context (own KV cache) over the same base with the same adapters: the same role twice."""
        return self._shared.role(*self.role_spec)

    def _adapters(self) -> list:
        return list(self._adapter_ptrs)  # the batched form (multiseq) applies them too

    def close(self) -> None:
        """Free this role's context; the shared model goes with the last role."""
        shared, self._shared = getattr(self, "_shared", None), None
        if shared is None:
            return
        for obj in (self._batch_obj, self._ctx_obj):
            if obj is not None:
                obj.close()
        self._batch_obj = self._ctx_obj = None
        self._llm = None
        shared._release()


def open_roles(base, per_role: dict, roles: Sequence[str] = ("expert", "amateur"), n_ctx: int = 2048,
               n_threads: int | None = None, n_gpu_layers: int = 0, n_batch: int = 512,
               kv_type: str = "f16", batch_steps: str = "auto") -> dict[str, LoraRoleBackend]:
    """Backends for `roles` over one loaded base GGUF; per_role maps each role to its (adapter path, scale)
    pairs (a shared-base bundle's: converters.lora.shared_base_roles)."""
    missing = [r for r in roles if r not in per_role]
    if missing:
        raise InputError(f"{base}: shared base has no role {missing[0]!r} (has {', '.join(per_role)})")
    shared = SharedBase(base, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, n_batch=n_batch,
                        kv_type=kv_type, batch_steps=batch_steps)
    out: dict[str, LoraRoleBackend] = {}
    try:
        for r in roles:
            out[r] = shared.role(per_role[r], label=r)
    except BaseException:
        for b in out.values():
            b.close()
        shared.close()
        raise
    return out
