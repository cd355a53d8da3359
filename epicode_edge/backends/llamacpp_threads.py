"""Thread counts of a llama.cpp context, for the single-sequence backend (backends/llamacpp.py) and its batched
form (backends/llamacpp_batch.py) alike."""

from __future__ import annotations

import os


def share_context_cores(owner, parts: int) -> None:
    """Set a llama.cpp context's (decode, batch) threads to its share of the cores when `parts` models run at
    once (1: the counts at load), unless threads were given at load. owner: a LlamaCppBackend or its batched
    form (backends/llamacpp_batch.py), with _lib, _ctx, threads, n_threads_given and _threads_at_load."""
    if owner.n_threads_given is not None:
        return
    cores = os.cpu_count() or 1
    threads = owner._threads_at_load if parts <= 1 else (max(1, cores // parts),) * 2
    if threads != owner.threads:
        owner._lib.llama_set_n_threads(owner._ctx, *threads)
        owner.threads = threads
