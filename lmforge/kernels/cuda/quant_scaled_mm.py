"""W8A8 GEMM with scales: y = (a_codes @ b_codes^T) * scales + bias, for int8 and float8_e4m3fn codes.

a [M, K] and b [N, K] (the checkpoint's own weight layout: K contiguous, which is what the tensor cores want for the
B operand too). Two scale modes:
  - per row and column: a_scale [M] (per token, or a static scale repeated), b_scale [N]; the integer (int32) or
    fp32 accumulator is scaled once at the end. An int8 activation zero point zp subtracts zp * sum_k b[n, k] first.
  - block-scaled (fine-grained FP8, DeepSeek-V3 style): a_scale [M, cdiv(K, BLOCK_K)] per token and K group,
    b_scale [cdiv(N, GROUP_N), cdiv(K, BLOCK_K)]; each K step's fp32 product is scaled before it is accumulated,
    so BLOCK_K is the quantization group along K.
Decode shapes split K over programs (quant_common.store_tile).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import stable_cache_keys
from .quant_common import FP8_ACC, pick_split_k, splitk_locks, splitk_workspace, store_tile


@triton.jit
def _scaled_mm_kernel(
    a_ptr,
    b_ptr,
    as_ptr,
    bs_ptr,
    bias_ptr,
    wsum_ptr,
    out_ptr,
    ws_ptr,
    lock_ptr,
    M,
    N,
    K,
    blocks_per_split,
    stride_am,
    stride_bn,
    stride_om,
    stride_asm,
    stride_bsn,
    zero_point,
    BLOCK_SCALED: tl.constexpr,
    GROUP_N: tl.constexpr,
    IS_INT: tl.constexpr,
    HAS_ZP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    num_n = tl.cdiv(N, BLOCK_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + kk[None, :]
    b_ptrs = b_ptr + cols.to(tl.int64)[None, :] * stride_bn + kk[:, None]
    kb_start = pid_k * blocks_per_split
    kb_end = tl.minimum(kb_start + blocks_per_split, tl.cdiv(K, BLOCK_K))
    if IS_INT:
        acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        if EVEN_K:
            a = tl.load(a_ptrs + kb * BLOCK_K, mask=row_mask[:, None], other=0.0)
            b = tl.load(b_ptrs + kb * BLOCK_K, mask=col_mask[None, :], other=0.0)
        else:
            k_mask = kb * BLOCK_K + kk < K
            a = tl.load(a_ptrs + kb * BLOCK_K, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs + kb * BLOCK_K, mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        if BLOCK_SCALED:
            a_s = tl.load(as_ptr + rows * stride_asm + kb, mask=row_mask, other=0.0)
            b_s = tl.load(bs_ptr + (cols // GROUP_N) * stride_bsn + kb, mask=col_mask, other=0.0)
            acc += tl.dot(a, b, max_num_imprecise_acc=FP8_ACC) * a_s[:, None] * b_s[None, :]
        elif IS_INT:
            acc_i = tl.dot(a, b, acc_i, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=FP8_ACC)
    if not BLOCK_SCALED:
        if IS_INT:
            if HAS_ZP:  # subtracted once, by the first split
                wsum = tl.load(wsum_ptr + cols, mask=col_mask, other=0.0)
                acc_i -= tl.where(pid_k == 0, zero_point * wsum, 0)[None, :]
            acc = acc_i.to(tl.float32)
        a_s = tl.load(as_ptr + rows, mask=row_mask, other=0.0)
        b_s = tl.load(bs_ptr + cols, mask=col_mask, other=0.0)
        acc = acc * a_s[:, None] * b_s[None, :]
    tile = pid_m * num_n + pid_n
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
        tile,
        num_n * tl.num_programs(1),
        pid_k,
        SPLIT,
        HAS_BIAS,
        BLOCK_M,
        BLOCK_N,
    )


def default_config(m: int, n: int, k: int, block_k: int, device: torch.device) -> dict:
    """Decode (M <= 16): one 16-row tile, K split over programs. More rows: no split (the fp32 partials would cost
    a large share of the weight bytes); measured on an H200 (benchmarks/quant.py --sweep, block-scaled FP8 on the
    llama-8b projections) 64x128 tiles were 1.4-3.6x faster than 128x128 at 300 rows, 128x128 with 4 stages best
    at 2048."""
    if m <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=4)
    elif m <= 1024:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4, SPLIT_K=1)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=4, SPLIT_K=1)
    cfg["BLOCK_K"] = block_k
    if m <= 16:
        tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
        cfg["SPLIT_K"] = pick_split_k(tiles, triton.cdiv(k, block_k), device, min_blocks_per_split=4)
    return cfg


def scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    block_size: tuple[int, int] | None = None,
    zero_point: int = 0,
    b_sum: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """a [M, K], b [N, K] (both int8 or both float8_e4m3fn) -> [M, N] of out_dtype. Without block_size: a_scale
    float32 [M], b_scale float32 [N]; zero_point with b_sum (int32 [N], sum over K of b) for asymmetric int8 codes.
    With block_size (bn, bk): a_scale [M, cdiv(K, bk)], b_scale [cdiv(N, bn), cdiv(K, bk)] (float8 only)."""
    m, k = a.shape
    n = b.shape[0]
    if a.dtype != b.dtype or a.dtype not in (torch.int8, torch.float8_e4m3fn) or b.shape[1] != k:
        raise ValueError(
            f"codes a {a.dtype} {tuple(a.shape)} and b {b.dtype} {tuple(b.shape)} must be int8 or "
            f"float8_e4m3fn [M, K] and [N, K]"
        )
    is_int = a.dtype == torch.int8
    if block_size is not None:
        bn, bk = block_size
        if is_int or bk < 16 or bk & (bk - 1):
            raise ValueError(f"block scales need float8 codes and a power-of-two K block >= 16, got {block_size}")
        want_a, want_b = (m, triton.cdiv(k, bk)), (triton.cdiv(n, bn), triton.cdiv(k, bk))
    else:
        bn, bk = 1, 128 if k >= 128 else max(16, triton.next_power_of_2(k))
        want_a, want_b = (m,), (n,)
    if tuple(a_scale.shape) != want_a or tuple(b_scale.shape) != want_b:
        raise ValueError(
            f"scales must be a {want_a} and b {want_b}, got {tuple(a_scale.shape)} and {tuple(b_scale.shape)}"
        )
    if zero_point and (b_sum is None or not is_int):
        raise ValueError("an activation zero point needs int8 codes and b_sum")
    a = a if a.stride(1) == 1 else a.contiguous()
    b = b if b.stride(1) == 1 else b.contiguous()
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    cfg = {**default_config(m, n, k, bk, a.device), **(config or {})}
    block_m, block_n, split_k = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["SPLIT_K"]
    if block_size is not None and cfg["BLOCK_K"] != bk:
        raise ValueError(f"block-scaled GEMMs step K by the scale block {bk}, got BLOCK_K={cfg['BLOCK_K']}")
    num_kb = triton.cdiv(k, cfg["BLOCK_K"])
    per_split = triton.cdiv(num_kb, split_k)
    split_k = triton.cdiv(num_kb, per_split)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
    ws = splitk_workspace(split_k, grid[0] * grid[1], block_m, block_n, a.device)
    _scaled_mm_kernel[grid](
        a,
        b,
        a_scale,
        b_scale,
        out if bias is None else bias,
        b_scale if b_sum is None else b_sum,
        out,
        ws,
        splitk_locks(a.device),
        m,
        n,
        k,
        per_split,
        a.stride(0),
        b.stride(0),
        out.stride(0),
        a_scale.stride(0),
        b_scale.stride(0),
        int(zero_point),
        BLOCK_SCALED=block_size is not None,
        GROUP_N=bn,
        IS_INT=is_int,
        HAS_ZP=bool(zero_point),
        HAS_BIAS=bias is not None,
        EVEN_K=k % cfg["BLOCK_K"] == 0,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=cfg["BLOCK_K"],
        SPLIT=split_k > 1,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


stable_cache_keys(globals())
