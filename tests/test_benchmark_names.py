"""A benchmark script runs with benchmarks/ as sys.path[0], so a script named like a package shadows it for every
import in that run (benchmarks/kernels.py hid Hugging Face's `kernels`, which transformers probes)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# optional packages transformers and torch look for at import time, installed here or not
PROBED = {"kernels", "accelerate", "peft", "bitsandbytes", "flash_attn", "triton", "xformers", "deepspeed", "optimum"}


def test_no_benchmark_script_shadows_a_module():
    names = {p.stem for p in BENCHMARKS.glob("*.py")}
    assert names, BENCHMARKS
    assert not names & PROBED, names & PROBED
    assert not names & set(sys.stdlib_module_names), names & set(sys.stdlib_module_names)
    assert str(BENCHMARKS) not in sys.path
    installed = [n for n in names if importlib.util.find_spec(n) is not None]  # found elsewhere: would be shadowed
    assert not installed, installed
