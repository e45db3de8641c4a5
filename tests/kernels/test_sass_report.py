"""tools/sass_report.py compiles a cuda-backend kernel for sm_90 from a CPU-tensor call of its wrapper (no GPU) and
reports its loops; a broken capture or signature would fail here rather than in the middle of a kernel session."""

import importlib.util
import os
import sys

import pytest

triton = pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool():
    spec = importlib.util.spec_from_file_location("sass_report", os.path.join(ROOT, "tools", "sass_report.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["sass_report"] = module
    spec.loader.exec_module(module)
    return module


def test_decode_attention_compiles_offline_with_a_tensor_core_loop():
    tool = _tool()
    if not os.access(tool._tool("cuobjdump"), os.X_OK) or not os.access(tool._tool("ptxas"), os.X_OK):
        pytest.skip("this triton wheel ships no ptxas / cuobjdump")
    rec = tool.report("decode:bf16:64")
    assert rec["kernel"] == "_decode_split_kernel" and rec["arch"] == "sm_90"
    assert 0 < rec["reg"] <= 255
    main = max(rec["loops"], key=lambda loop: loop["instructions"])
    # the key loop does its two dots on tensor cores (mma.sync or warpgroup MMA) and loads K/V tiles
    assert any(op in main["ops"] for op in ("HMMA", "HGMMA")), main
    assert any(m.split(".")[0] in ("LDG", "LDGSTS") for m in main["memory"]), main
