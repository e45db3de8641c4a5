"""Activation quantization for the W8A8 GEMMs: x [M, K] (fp16/bf16/fp32) -> codes [M, K] (int8 or float8_e4m3fn) and
float32 scales, one per row (per token) or one per row and `group` columns (fine-grained FP8), so x ~= codes * scale.

Dynamic: scale = max(amax / QMAX, MIN_SCALE) over the row or group (QMAX 127 for int8, 448 for e4m3). Static: the given
per-tensor scale, copied into every row's slot so the GEMM reads per-row scales either way. int8 codes are
round-half-to-even(x / scale) (+ zero point), clamped to [-128, 127]; e4m3 codes clamp x / scale to +-448 and round
to nearest even in the cast. One program per row (or per row and block of groups), two passes over a row when it is
wider than one block (the second from L2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import stable_cache_keys

MIN_SCALE = 1e-12  # an all-zero row gets a tiny scale and zero codes instead of 0 / 0 (as the cpu reference)
FP8_MAX = 448.0
INT8_MAX = 127.0
# adding then subtracting 1.5 * 2**23 rounds an fp32 of magnitude < 2**22 to the nearest integer, ties to even
_RNE_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _to_codes(v, zero_point, IS_INT: tl.constexpr, QMAX: tl.constexpr):
    if IS_INT:
        v = tl.minimum(tl.maximum(v, -256.0), 256.0)  # keeps the rounding trick in range; clamped below
        v = (v + _RNE_MAGIC) - _RNE_MAGIC + zero_point
        codes = tl.minimum(tl.maximum(v, -128.0), 127.0).to(tl.int8)
    else:
        codes = tl.minimum(tl.maximum(v, -QMAX), QMAX).to(tl.float8e4nv)
    return codes


@triton.jit
def _quant_rows_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    static_ptr,
    K,
    stride_x,
    stride_q,
    zero_point,
    IS_INT: tl.constexpr,
    QMAX: tl.constexpr,
    STATIC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + row * stride_x
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, axis=0) / QMAX, 1e-12)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        mask = k0 + offs < K
        x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_q + k0 + offs, _to_codes(x / scale, zero_point, IS_INT, QMAX), mask=mask)


@triton.jit
def _quant_groups_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    K,
    num_groups,
    stride_x,
    stride_q,
    stride_s,
    QMAX: tl.constexpr,
    GROUP: tl.constexpr,
    GROUPS_PER_PROGRAM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = (groups < num_groups)[:, None] & (cols < K)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1) / QMAX, 1e-12)
    tl.store(s_ptr + row * stride_s + groups, scale, mask=groups < num_groups)
    tl.store(q_ptr + row * stride_q + cols, _to_codes(x / scale[:, None], 0.0, False, QMAX), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got {tuple(x.shape)}")
    return x if x.stride(1) == 1 else x.contiguous()


def quantize_per_token(
    x: torch.Tensor, dtype: torch.dtype, static_scale: torch.Tensor | None = None, zero_point: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes [M, K] of dtype int8 or float8_e4m3fn, scales [M] float32). static_scale: a float32 [1]
    (or []) tensor for static per-tensor quantization; zero_point (int8 static only) is added to the codes."""
    x = _rows(x)
    if dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"activation codes must be int8 or float8_e4m3fn, got {dtype}")
    if zero_point and (dtype != torch.int8 or static_scale is None):
        raise ValueError("an activation zero point needs static int8 quantization")
    if static_scale is not None and static_scale.numel() != 1:
        raise ValueError(f"a static activation scale is one value, got shape {tuple(static_scale.shape)}")
    m, k = x.shape
    codes = torch.empty(m, k, dtype=dtype, device=x.device)
    scales = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return codes, scales
    is_int = dtype == torch.int8
    block = min(4096, triton.next_power_of_2(k))
    _quant_rows_kernel[(m,)](
        x,
        codes,
        scales,
        scales if static_scale is None else static_scale,
        k,
        x.stride(0),
        codes.stride(0),
        float(zero_point),
        IS_INT=is_int,
        QMAX=INT8_MAX if is_int else FP8_MAX,
        STATIC=static_scale is not None,
        BLOCK=block,
        num_warps=4 if block <= 1024 else 8,
    )
    return codes, scales


def quantize_per_group_fp8(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8_e4m3fn codes [M, K], float32 scales [M, cdiv(K, group)]), one scale per token and group
    of `group` columns (a power of two)."""
    x = _rows(x)
    if group < 16 or group & (group - 1):
        raise ValueError(f"activation group must be a power of two >= 16, got {group}")
    m, k = x.shape
    num_groups = triton.cdiv(k, group)
    codes = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(m, num_groups, dtype=torch.float32, device=x.device)
    if m == 0:
        return codes, scales
    per_program = max(1, min(triton.next_power_of_2(num_groups), 2048 // group))
    _quant_groups_kernel[(m, triton.cdiv(num_groups, per_program))](
        x,
        codes,
        scales,
        k,
        num_groups,
        x.stride(0),
        codes.stride(0),
        scales.stride(0),
        QMAX=FP8_MAX,
        GROUP=group,
        GROUPS_PER_PROGRAM=per_program,
        num_warps=4,
    )
    return codes, scales


stable_cache_keys(globals())
