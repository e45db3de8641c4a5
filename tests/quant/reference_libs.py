"""The format's own reference code, imported without the packages' top-level `__init__` (which pulls in
datasets, CUDA extensions or APIs transformers 5 removed): AutoAWQ's gemm packer and AutoGPTQ's QuantLinear
(pack + its pure-torch dequantizing forward). Both packages are installed with `pip install --no-deps`
(scripts/setup.sh test); a test that needs one skips when it is absent."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


def _import_skipping_init(package: str, module: str):
    if module in sys.modules:
        return sys.modules[module]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed (pip install --no-deps, see scripts/setup.sh)")
    root = spec.submodule_search_locations[0]
    parts = module.split(".")
    # a bare package object for every level above the module, so their __init__ files do not run
    for i in range(1, len(parts)):
        name = ".".join(parts[:i])
        if name in sys.modules and not getattr(sys.modules[name], "_lmforge_stub", False):
            continue
        stub = types.ModuleType(name)
        stub.__path__ = [root + "/" + "/".join(parts[1:i])] if i > 1 else [root]
        stub._lmforge_stub = True
        sys.modules[name] = stub
    return importlib.import_module(module)


def awq_gemm():
    """awq.modules.linear.gemm: WQLinear_GEMM.from_linear packs (AutoAWQ's own order map), dequantize_gemm."""
    return _import_skipping_init("awq", "awq.modules.linear.gemm")


def gptq_quant_linear():
    """AutoGPTQ 0.7.1's QuantLinear (qlinear_cuda): pack() writes the GPTQ v1 format; forward dequantizes in
    torch on CPU (its CUDA extension is not used)."""
    return _import_skipping_init("auto_gptq", "auto_gptq.nn_modules.qlinear.qlinear_cuda").QuantLinear
