"""A CPU engine's memory must not grow with the number of distinct batch shapes it has seen: torch's CPU GEMMs
keep a compiled kernel per shape in two caches (oneDNN's and ideep's, 1024 entries each by default), which is
how a long-running CPU server's RSS crept up by hundreds of MB. The engine caps both before its first GEMM."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lmforge.engine import host_memory

# 300 distinct token counts through two bf16 linears shaped like SmolLM2's MLP, in a fresh interpreter (the
# caches read their capacity once). Prints the RSS growth in MB after malloc_trim.
_SHAPES = """
import ctypes, sys, psutil, torch
from lmforge.engine.host_memory import bound_cpu_kernel_caches, release_free_host_memory
if sys.argv[1] == "capped":
    bound_cpu_kernel_caches()
torch.set_num_threads(1)
w1, w2 = torch.randn(1536, 576, dtype=torch.bfloat16), torch.randn(576, 1536, dtype=torch.bfloat16)
def rss():
    release_free_host_memory()
    return psutil.Process().memory_info().rss / 2**20
torch.nn.functional.linear(torch.randn(1, 576, dtype=torch.bfloat16), w1)
before = rss()
for m in range(2, 302):
    torch.nn.functional.linear(torch.nn.functional.linear(torch.randn(m, 576, dtype=torch.bfloat16), w1), w2)
print(rss() - before)
"""


def _growth_mb(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    out = subprocess.run(
        [sys.executable, "-c", _SHAPES, mode], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS and malloc_trim as on Linux")
def test_cpu_gemm_kernel_caches_are_bounded():
    uncapped = _growth_mb("uncapped")
    if uncapped < 150:
        pytest.skip(f"this CPU's GEMMs keep little per shape ({uncapped:.0f} MB uncapped): nothing to bound")
    capped = _growth_mb("capped")
    # this machine (AMD EPYC, oneDNN bf16 GEMMs): ~360 MB uncapped, ~40 MB capped
    assert capped < uncapped / 3, f"capped caches still grew RSS by {capped:.0f} MB (uncapped: {uncapped:.0f} MB)"


def test_bound_cpu_kernel_caches_keeps_the_users_values(monkeypatch):
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "8")
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    host_memory.bound_cpu_kernel_caches(64)
    assert os.environ["LRU_CACHE_CAPACITY"] == "8"
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"
