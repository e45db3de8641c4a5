"""Giving freed host memory back to the OS. CPU steps allocate tensors whose sizes follow the batch
(logits, activations, gathered keys); glibc keeps the freed space in its heaps, so a long-running CPU
server's resident memory creeps up with every new mix of shapes. malloc_trim returns those free pages."""

from __future__ import annotations

import ctypes
import ctypes.util
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
