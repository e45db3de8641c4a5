"""Giving freed host memory back to the OS. CPU steps allocate tensors whose sizes follow the batch
(logits, activations, gathered keys); glibc keeps the freed space in its heaps, so a long-running CPU
server's resident memory creeps up with every new mix of shapes. malloc_trim returns those free pages."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_libc = None


def release_free_host_memory() -> None:
    """malloc_trim(0) where glibc provides it; a no-op elsewhere."""
    global _libc
    if not sys.platform.startswith("linux"):
        return
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


def bound_cpu_kernel_caches(capacity: int = 64) -> None:
    """Cap the two per-shape kernel caches of torch's CPU GEMMs: oneDNN's primitive cache and ideep's
    (torch's oneDNN wrapper) computation cache, 1024 entries each by default. CPU batches come in many
    token counts, and each new one cached a few MB of compiled kernels: 500 distinct shapes of two bf16
    linears grew a process by ~630 MB uncapped, by 50 MB with these caps. A decode step reuses a handful of
    shapes, so 64 costs no speed. Both are read at the first GEMM, so call this before the model runs;
    a value the user set wins."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))
    os.environ.setdefault("LRU_CACHE_CAPACITY", str(capacity))
