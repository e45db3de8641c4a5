"""The grouped quantized-MoE kernel compiles for Hopper (sm_90) without a GPU: Triton's GPU front end refuses what
the interpreter accepts (non-constexpr globals, branches returning different types), so the CPU-only suite runs
the real compiler (Triton's bundled ptxas) on one variant per weight format. No gpu marker: it needs no device."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from triton.compiler import ASTSource  # noqa: E402

from lmforge.kernels.cuda import fused_moe, quant_moe  # noqa: E402

try:
    from triton.backends.compiler import GPUTarget

    triton.compile  # noqa: B018
except (ImportError, AttributeError):  # pragma: no cover
    pytest.skip("this Triton cannot compile ahead of time", allow_module_level=True)

POINTERS = {
    "a_ptr": "*bf16",
    "a_scale_ptr": "*fp32",
    "w_ptr": "*fp8e4nv",
    "ws_ptr": "*fp32",
    "wz_ptr": "*fp32",
    "out_ptr": "*bf16",
    "sorted_ids_ptr": "*i32",
    "topk_ids_ptr": "*i64",
    "topk_weights_ptr": "*fp32",
}
INTS = (
    "num_slots",
    "top_k",
    "N",
    "K",
    "num_m",
    "num_groups",
    "stride_am",
    "stride_we",
    "stride_wn",
    "stride_wk",
    "stride_se",
    "stride_sn",
    "stride_sk",
    "stride_om",
)
DEFAULTS = dict(
    GATED=True,
    ACT="silu",
    W_MODE="block",
    A_MODE="group",
    IS_INT=False,
    GROUP_N=128,
    BITS=8,
    GROUP=1,
    SCALE_PER_BLOCK=False,
    HAS_ZEROS=False,
    SYM_ZERO=0.0,
    BLOCK_M=16,
    BLOCK_N=64,
    BLOCK_K=128,
    GROUP_M=8,
    EVEN_K=True,
    DOT_PRECISION="tf32",
)
VARIANTS = {
    "fp8-block-gate-up": ({}, {}),
    "int8-static-down": ({"w_ptr": "*i8"}, dict(W_MODE="row", A_MODE="static", IS_INT=True, GATED=False)),
    "int4-g64-asym": (
        {"w_ptr": "*i32", "ws_ptr": "*bf16", "wz_ptr": "*bf16"},
        dict(W_MODE="wna16", A_MODE="float", BITS=4, GROUP=64, HAS_ZEROS=True, EVEN_K=False),
    ),
}


def _compile(fn, signature: dict, constants: dict, num_warps: int = 4) -> None:
    signature = {**signature, **{name: "constexpr" for name in constants}}
    try:
        triton.compile(
            ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}
        )
    except FileNotFoundError as e:  # no bundled ptxas in this install
        pytest.skip(f"no CUDA toolchain for ahead-of-time compiles: {e}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_qmoe_kernel_compiles_for_sm90(variant):
    pointers, constants = VARIANTS[variant]
    _compile(quant_moe._qmoe_kernel, {**POINTERS, **pointers, **dict.fromkeys(INTS, "i32")}, {**DEFAULTS, **constants})


def test_align_kernel_compiles_for_sm90():
    signature = {
        "topk_ids_ptr": "*i64",
        "sorted_ids_ptr": "*i32",
        "start_ptr": "*i32",
        "num_slots": "i32",
        "num_experts": "i32",
        "length": "i32",
    }
    _compile(fused_moe._align_kernel, signature, dict(BLOCK_M=16, BLOCK_S=512, BLOCK_E=256, CHUNK=64, FILL=1024), 8)
