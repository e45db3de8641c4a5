"""More rows over the column-major int4 layout of quant_w4gemv: `w4_dot` (tensor cores: per K tile and field a
[rows, 16] x [16, columns] dot of x with the codes as MAGIC + q in the activation dtype, the offset and zero point
applied per tile) and `w4_dequantize` (the dense weight, for a GEMM at large M), so one copy of the weight serves every
batch size."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dot_precision, stable_cache_keys
from .quant_common import pick_split_k, splitk_locks, splitk_workspace, store_tile
from .quant_w4gemv import TK, _fields, gemv_supported
from .quant_wna16 import _unpack, magic_offset, unpack_asm


@triton.jit
def _w4_dot_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    ws_ptr,
    lock_ptr,
    M,
    N,
    K,
    tiles_per_split,
    stride_xm,
    stride_om,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    SYM_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    MAGIC: tl.constexpr,
    UNPACK16_ASM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Tensor-core variant over the same layout, for a few to a few dozen rows: per K tile and field j a
    [BLOCK_M, 16] x [16, BLOCK_N] dot of x with the codes as MAGIC + q in the activation dtype (exact; two per logic
    op, quant_wna16.unpack_asm), then per tile acc += s * (sum_k x (MAGIC + q) - (MAGIC + z) * sum_k x)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    num_n = tl.cdiv(N, BLOCK_N)
    dtype = x_ptr.dtype.element_ty
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    w16 = tl.arange(0, 16)[None, :]  # word (a, b) = 4 a + b of a column's K tile
    q_ptrs = qw_ptr + cols.to(tl.int64)[:, None] * (K // 8) + w16
    # field j of word (a, b) is k = 32 a + 4 j + b of the tile
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + (32 * (w16 // 4) + w16 % 4)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    k128 = tl.arange(0, 128)[None, :]
    num_tiles = tl.cdiv(K, 128)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, num_tiles)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(t_start, t_end):
        if EVEN_N:
            q = tl.load(q_ptrs + t * 16)
        else:
            q = tl.load(q_ptrs + t * 16, mask=(cols < N)[:, None], other=0)
        codes = _unpack(q, 4, MAGIC, UNPACK16_ASM, dtype)  # MAGIC + q in the activation dtype, two per op
        part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        x_tile = tl.load(x_rows + t * 128 + k128, mask=row_mask[:, None], other=0.0)
        x_sum = tl.sum(x_tile.to(tl.float32), axis=1)
        for j in tl.static_range(8):
            xj = tl.load(x_ptrs + t * 128 + 4 * j, mask=row_mask[:, None], other=0.0)
            part = tl.dot(xj, tl.trans(codes[j]), part, input_precision=DOT_PRECISION)
        g = (t * 128) // GROUP
        if EVEN_N:
            s = tl.load(s_ptr + g * N + cols).to(tl.float32)
        else:
            s = tl.load(s_ptr + g * N + cols, mask=cols < N, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            if EVEN_N:
                z = tl.load(z_ptr + g * N + cols).to(tl.float32)
            else:
                z = tl.load(z_ptr + g * N + cols, mask=cols < N, other=0.0).to(tl.float32)
        else:
            z = tl.full([BLOCK_N], SYM_ZERO, dtype=tl.float32)
        acc += (part - x_sum[:, None] * (z + MAGIC)[None, :]) * s[None, :]
    store_tile(
        acc,
        out_ptr,
        bias_ptr,
        ws_ptr,
        lock_ptr,
        rows,
        cols,
        M,
        N,
        stride_om,
        pid_m * num_n + pid_n,
        num_n * tl.num_programs(1),
        pid_k,
        SPLIT,
        HAS_BIAS,
        BLOCK_M,
        BLOCK_N,
    )


@triton.jit
def _w4_dequant_kernel(
    qw_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    N,
    K,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    SYM_ZERO: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ASM: tl.constexpr,
):
    """W^T [K, N] = (q - z) * s in out's dtype, one K tile x BLOCK_N columns per program."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w16 = tl.arange(0, 16)[None, :]
    q = tl.load(qw_ptr + cols.to(tl.int64)[:, None] * (K // 8) + t * 16 + w16, mask=col_mask[:, None], other=0)
    f = _fields(q, ASM)
    g = (t * 128) // GROUP
    s = tl.load(s_ptr + g * N + cols, mask=col_mask, other=0.0).to(tl.float32)[:, None]
    if HAS_ZEROS:
        z = tl.load(z_ptr + g * N + cols, mask=col_mask, other=0.0).to(tl.float32)[:, None]
    else:
        z = tl.full([BLOCK_N, 1], SYM_ZERO, dtype=tl.float32)
    k0 = t * 128 + 32 * (w16 // 4) + w16 % 4
    for j in tl.static_range(8):
        w = (f[j] - (z + (128.0 if j % 2 == 0 else 2048.0))) * s
        ptrs = out_ptr + (k0 + 4 * j).to(tl.int64) * N + cols[:, None]
        tl.store(ptrs, w.to(out_ptr.dtype.element_ty), mask=col_mask[:, None])


def _check_args(x_shape, qweight, scales, group_size):
    m, k = x_shape
    n = scales.shape[1]
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (n, k // 8):
        raise ValueError(f"qweight must be the GEMV-layout int32 [{n}, {k // 8}], got {qweight.dtype} {qweight.shape}")
    group = min(group_size, k)
    if not gemv_supported(4, group, k) or tuple(scales.shape) != (k // group, n):
        raise ValueError(f"w4: K={k} / group {group_size} / scales {tuple(scales.shape)} do not fit the layout")
    return m, k, n, group


def w4_dot(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    sym_zero: int = 8,
    config: dict | None = None,
) -> torch.Tensor:
    """The tensor-core variant of `w4_gemv` (same arguments), for M from a few rows to a few dozen."""
    m, k, n, group = _check_args(x.shape, qweight, scales, group_size)
    if x.stride(1) != 1:
        x = x.contiguous()
    out = x.new_empty(m, n)
    if m == 0:
        return out
    cfg = dict(BLOCK_M=16 if m <= 16 else 32 if m <= 32 else 64, BLOCK_N=128, num_warps=4, num_stages=3, waves=3.0)
    cfg.update(config or {})
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    num_tiles = k // TK
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k = cfg.get("SPLIT_K") or pick_split_k(tiles, num_tiles, x.device, min_blocks_per_split=2, waves=cfg["waves"])
    per_split = triton.cdiv(num_tiles, split_k)
    split_k = triton.cdiv(num_tiles, per_split)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
    ws = splitk_workspace(split_k, grid[0] * grid[1], block_m, block_n, x.device)
    magic = magic_offset(x.dtype, 4)
    _w4_dot_kernel[grid](
        x,
        qweight,
        scales,
        scales if zeros is None else zeros,
        out if bias is None else bias,
        out,
        ws,
        splitk_locks(x.device),
        m,
        n,
        k,
        per_split,
        x.stride(0),
        out.stride(0),
        GROUP=group,
        HAS_ZEROS=zeros is not None,
        SYM_ZERO=sym_zero,
        HAS_BIAS=bias is not None,
        EVEN_N=n % block_n == 0,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        SPLIT=split_k > 1,
        MAGIC=magic,
        UNPACK16_ASM=unpack_asm(4, magic) if cfg.get("ASM", True) and x.is_cuda else "",
        DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def w4_dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int, sym_zero: int = 8
) -> torch.Tensor:
    """The GEMV-layout weight -> W^T [K, N] in scales' dtype (for a dense GEMM at large M)."""
    n, words = qweight.shape
    k = words * 8
    _, _, _, group = _check_args((0, k), qweight, scales, group_size)
    out = scales.new_empty(k, n)
    block_n = 64
    _w4_dequant_kernel[(k // TK, triton.cdiv(n, block_n))](
        qweight,
        scales,
        scales if zeros is None else zeros,
        out,
        n,
        k,
        GROUP=group,
        HAS_ZEROS=zeros is not None,
        SYM_ZERO=sym_zero,
        BLOCK_N=block_n,
        ASM=qweight.is_cuda,
        num_warps=4,
    )
    return out


stable_cache_keys(globals())
