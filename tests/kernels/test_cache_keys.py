"""Triton's disk-cache key of a kernel must not depend on which kernel a process compiled first: Triton 3.6 folds a
callee's globals into a caller's key only when the callee's key already exists, so decode and prefill attention
(sharing helpers) got new keys on every start and recompiled with a warm cache. lmforge computes every kernel
module's keys as it imports (kernels/cuda/common.stable_cache_keys); this runs two processes that touch the keys
in opposite orders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
KERNELS = [
    ("lmforge.kernels.cuda.prefill_attention", "_prefill_attention_kernel"),
    ("lmforge.kernels.cuda.decode_attention", "_decode_split_kernel"),
    ("lmforge.kernels.cuda.quant_wna16", "_wna16_kernel"),
    ("lmforge.kernels.cuda.quant_moe", "_qmoe_kernel"),
]


def _keys(order: list[tuple[str, str]]) -> dict[str, str]:
    code = (
        "import importlib, json, sys\n"
        "keys = {}\n"
        "for mod, name in json.loads(sys.argv[1]):\n"
        "    keys[name] = getattr(importlib.import_module(mod), name).cache_key\n"
        "print(json.dumps(keys))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(order)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kernel_cache_keys_do_not_depend_on_the_order_kernels_are_first_used():
    forward, backward = _keys(KERNELS), _keys(KERNELS[::-1])
    assert forward == backward
    assert len(set(forward.values())) == len(KERNELS)
