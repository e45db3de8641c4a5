"""Weight-only quantized GEMM (W4A16 / W8A16): y = x @ dequant(qweight) + bias, dequantized in registers.

Weight layout (made once by `repack`, from the canonical GPTQ-style [K // p, N] int32 with p = 32 // bits values
per word along K): K is cut into chunks of CH = p * KS rows; inside a chunk, word row i of column n holds, in its
j-th `bits`-wide field, the weight of k = chunk * CH + j * KS + i. So field j of a [KS, BLOCK_N] word tile is a
[KS, BLOCK_N] weight tile of KS consecutive k: the kernel shifts and masks it and feeds it straight to a dot with
x[:, k .. k + KS], no reshape or gather. Words along N are contiguous (16-byte loads across a warp).

Scales and zero points stay [K // G, N] in the activation dtype; the kernel dequantizes (q - z) * s in that dtype
(q - z is an exact small integer there, so this equals the fp32 formula rounded once). Optionally q becomes a float
by OR-ing its bits into the mantissa of a power of two (1024 for fp16, 128 for 4-bit bf16): one logic op instead of
an int-to-float conversion. Decode shapes split K over programs (quant_common.store_tile); large M can instead
dequantize the whole weight to the activation dtype once per call and use cuBLAS (`dequantize`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dot_precision
from .quant_common import num_sms, pick_split_k, splitk_locks, splitk_workspace, store_tile

KS = 16  # k rows per bit field of a word tile (the smallest dot K); CH = (32 // bits) * KS k rows per chunk


def magic_offset(dtype: torch.dtype, bits: int) -> int:
    """The float whose mantissa takes q's bits (0 when the dtype cannot hold 2**bits values above it exactly)."""
    if dtype == torch.float16:
        return 1024
    if dtype == torch.bfloat16 and bits == 4:
        return 128
    return 0


def repack(qweight: torch.Tensor, bits: int, ks: int = KS) -> torch.Tensor:
    """Canonical [K // p, N] int32 -> the kernel's chunked layout [cdiv(K, p * ks) * ks, N] int32 (K padded with
    zero weights to whole chunks)."""
    p = 32 // bits
    mask = (1 << bits) - 1
    rows, n = qweight.shape
    k = rows * p
    shifts = torch.arange(p, device=qweight.device, dtype=torch.int32) * bits
    q = (qweight[:, None, :] >> shifts[None, :, None]) & mask  # [K // p, p, N], k = row * p + field
    q = q.reshape(k, n)
    chunk = p * ks
    k_pad = triton.cdiv(k, chunk) * chunk
    if k_pad != k:
        q = torch.cat([q, q.new_zeros(k_pad - k, n)])
    q = q.view(k_pad // chunk, p, ks, n)  # [chunk, field j, row i, n]
    packed = torch.zeros(k_pad // chunk, ks, n, dtype=torch.int32, device=qweight.device)
    for j in range(p):
        packed |= q[:, j] << (bits * j)
    return packed.view(k_pad // p, n)


@triton.jit
def _codes(w, MASK: tl.constexpr, MAGIC: tl.constexpr, DTYPE: tl.constexpr):
    """The low bits (w & MASK) as MAGIC + code in DTYPE (exact)."""
    if MAGIC == 1024:
        return ((w & MASK) | 0x6400).to(tl.int16).to(DTYPE, bitcast=True)
    elif MAGIC == 128:
        return ((w & MASK) | 0x4300).to(tl.int16).to(DTYPE, bitcast=True)
    else:
        return (w & MASK).to(DTYPE)


@triton.jit
def _group_params(
    s_ptr, z_ptr, g, N, cols, col_mask, zero, HAS_ZEROS: tl.constexpr, MAGIC: tl.constexpr, EVEN_N: tl.constexpr
):
    """Scale and (magic-offset) zero point rows [1, BLOCK_N] of group g."""
    if EVEN_N:
        s = tl.load(s_ptr + g * N + cols)[None, :]
    else:
        s = tl.load(s_ptr + g * N + cols, mask=col_mask, other=0.0)[None, :]
    if HAS_ZEROS:
        if EVEN_N:
            z = (tl.load(z_ptr + g * N + cols) + MAGIC)[None, :]
        else:
            z = (tl.load(z_ptr + g * N + cols, mask=col_mask, other=0.0) + MAGIC)[None, :]
    else:
        z = zero
    return s, z


@triton.jit
def _wna16_kernel(
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
    num_groups,
    chunks_per_split,
    stride_xm,
    stride_om,
    BITS: tl.constexpr,
    KS: tl.constexpr,
    GROUP: tl.constexpr,
    SCALE_PER_CHUNK: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    SYM_ZERO: tl.constexpr,
    MAGIC: tl.constexpr,
    USE_DOT: tl.constexpr,
    FOLD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    P: tl.constexpr = 32 // BITS
    CH: tl.constexpr = P * KS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    num_n = tl.cdiv(N, BLOCK_N)
    dtype = x_ptr.dtype.element_ty
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    row_mask = rows < M
    ki = tl.arange(0, KS)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ki[None, :]
    q_ptrs = qw_ptr + ki[:, None] * N + cols[None, :]
    num_chunks = tl.cdiv(K, CH)
    c_start = pid_k * chunks_per_split
    c_end = tl.minimum(c_start + chunks_per_split, num_chunks)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    zero = tl.full([1, BLOCK_N], SYM_ZERO + MAGIC, dtype=dtype)
    if not USE_DOT:
        acc_2d = tl.zeros([KS, BLOCK_N], dtype=tl.float32)  # GEMV: per-element sums, one reduction at the end
    for c in range(c_start, c_end):
        if EVEN_N:
            q = tl.load(q_ptrs + c * (KS * N))
        else:
            q = tl.load(q_ptrs + c * (KS * N), mask=col_mask[None, :], other=0)
        if SCALE_PER_CHUNK:
            g = tl.minimum((c * CH) // GROUP, num_groups - 1)
            s, z = _group_params(s_ptr, z_ptr, g, N, cols, col_mask, zero, HAS_ZEROS, MAGIC, EVEN_N)
        if FOLD:
            acc_c = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            x_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for j in tl.static_range(P):
            k0 = c * CH + j * KS
            if not SCALE_PER_CHUNK:
                g = tl.minimum(k0 // GROUP, num_groups - 1)
                s, z = _group_params(s_ptr, z_ptr, g, N, cols, col_mask, zero, HAS_ZEROS, MAGIC, EVEN_N)
            if EVEN_K:
                x = tl.load(x_ptrs + k0, mask=row_mask[:, None], other=0.0)
            else:
                x = tl.load(x_ptrs + k0, mask=row_mask[:, None] & ((k0 + ki) < K)[None, :], other=0.0)
            if FOLD:
                # sum_k x (q - z) s = s (sum_k x (MAGIC + q) - (MAGIC + z) sum_k x): codes go to the dot as they are
                acc_c = tl.dot(x, _codes(q >> (BITS * j), MASK, MAGIC, dtype), acc_c, input_precision=DOT_PRECISION)
                x_sum += tl.sum(x.to(tl.float32), axis=1)
            else:
                w = (_codes(q >> (BITS * j), MASK, MAGIC, dtype) - z) * s
                if USE_DOT:
                    acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
                else:  # BLOCK_M == 1: x [1, KS] -> [KS, 1]
                    acc_2d += w.to(tl.float32) * tl.reshape(x, [KS, 1]).to(tl.float32)
        if FOLD:
            acc += (acc_c - x_sum[:, None] * z.to(tl.float32)) * s.to(tl.float32)
    if not USE_DOT:
        acc = tl.sum(acc_2d, axis=0)[None, :]
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


@triton.jit
def _wna16_dequant_kernel(
    qw_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    N,
    K,
    num_groups,
    BITS: tl.constexpr,
    KS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    SYM_ZERO: tl.constexpr,
    MAGIC: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    P: tl.constexpr = 32 // BITS
    CH: tl.constexpr = P * KS
    MASK: tl.constexpr = (1 << BITS) - 1
    c = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ki = tl.arange(0, KS)
    dtype = out_ptr.dtype.element_ty
    q = tl.load(qw_ptr + (c * KS + ki)[:, None] * N + cols[None, :], mask=col_mask[None, :], other=0)
    for j in tl.static_range(P):
        k = c * CH + j * KS + ki
        g = tl.minimum(k // GROUP, num_groups - 1)
        s = tl.load(s_ptr + g[:, None] * N + cols[None, :], mask=col_mask[None, :], other=0.0)
        if HAS_ZEROS:
            z = tl.load(z_ptr + g[:, None] * N + cols[None, :], mask=col_mask[None, :], other=0.0) + MAGIC
        else:
            z = tl.full([KS, BLOCK_N], SYM_ZERO + MAGIC, dtype=dtype)
        w = (_codes(q >> (BITS * j), MASK, MAGIC, dtype) - z) * s
        tl.store(out_ptr + k.to(tl.int64)[:, None] * N + cols[None, :], w, mask=(k < K)[:, None] & col_mask[None, :])


def _check(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    k: int,
    ks: int,
) -> None:
    p = 32 // bits
    n = scales.shape[1]
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (triton.cdiv(k, p * ks) * ks, n):
        raise ValueError(
            f"qweight must be the repacked int32 [{triton.cdiv(k, p * ks) * ks}, {n}], "
            f"got {qweight.dtype} {tuple(qweight.shape)}"
        )
    if tuple(scales.shape) != (triton.cdiv(k, group_size), n) or scales.dtype != x.dtype:
        raise ValueError(
            f"scales must be {x.dtype} [{triton.cdiv(k, group_size)}, {n}], got {scales.dtype} {tuple(scales.shape)}"
        )
    if zeros is not None and (zeros.shape != scales.shape or zeros.dtype != scales.dtype):
        raise ValueError(f"zeros must match scales {tuple(scales.shape)}, got {zeros.dtype} {tuple(zeros.shape)}")
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {tuple(x.shape)}")
    if group_size % ks and group_size < k:
        raise ValueError(f"group size {group_size} must be a multiple of {ks} (or cover all of K={k})")


def default_config(m: int, n: int, k: int, bits: int, device: torch.device) -> dict:
    """Tiles by M: decode (M <= 16) one 16-row tile and split K; mid M 32/64-row tiles; prefill 64/128-row tiles."""
    chunks = triton.cdiv(k, (32 // bits) * KS)
    if m <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=128 if n >= 4096 else 64, num_warps=4, num_stages=4)
    elif m <= 64:
        cfg = dict(BLOCK_M=32 if m <= 32 else 64, BLOCK_N=128, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=64 if m <= 128 else 128, BLOCK_N=128, num_warps=8, num_stages=3)
    # FOLD: scales and zero points applied per chunk to the dot of raw codes (where a chunk is in one group)
    cfg.update(USE_DOT=True, FOLD=True)
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    cfg["SPLIT_K"] = pick_split_k(tiles, chunks, device)
    return cfg


def wna16_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    sym_zero: int = 0,
    magic: bool = True,
    config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] (fp16/bf16/fp32) @ dequant(qweight) -> [M, N] in x's dtype. qweight is `repack`ed; scales/zeros
    [cdiv(K, G), N] in x's dtype; zeros None means the constant sym_zero. config overrides `default_config`."""
    m, k = x.shape
    n = scales.shape[1]
    _check(x, qweight, scales, zeros, bits, group_size, k, KS)
    if x.stride(1) != 1:
        x = x.contiguous()
    out = x.new_empty(m, n) if out is None else out
    if m == 0:
        return out
    cfg = {**default_config(m, n, k, bits, x.device), **(config or {})}
    block_m, block_n, split_k = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["SPLIT_K"]
    if not cfg["USE_DOT"] and block_m != 1:
        raise ValueError("the dot-free (GEMV) variant takes BLOCK_M=1")
    chunk = (32 // bits) * KS
    num_chunks = triton.cdiv(k, chunk)
    chunks_per_split = triton.cdiv(num_chunks, split_k)
    split_k = triton.cdiv(num_chunks, chunks_per_split)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
    scale_per_chunk = group_size % chunk == 0 or group_size >= k
    num_tiles = grid[0] * grid[1]
    ws = splitk_workspace(split_k, num_tiles, block_m, block_n, x.device)
    locks = splitk_locks(x.device)
    _wna16_kernel[grid](
        x,
        qweight,
        scales,
        scales if zeros is None else zeros,
        out if bias is None else bias,
        out,
        ws,
        locks,
        m,
        n,
        k,
        scales.shape[0],
        chunks_per_split,
        x.stride(0),
        out.stride(0),
        BITS=bits,
        KS=KS,
        GROUP=min(group_size, k),
        SCALE_PER_CHUNK=scale_per_chunk,
        HAS_ZEROS=zeros is not None,
        SYM_ZERO=sym_zero,
        MAGIC=magic_offset(x.dtype, bits) if magic else 0,
        USE_DOT=cfg["USE_DOT"],
        FOLD=cfg.get("FOLD", True) and cfg["USE_DOT"] and scale_per_chunk,
        HAS_BIAS=bias is not None,
        EVEN_N=n % block_n == 0,
        EVEN_K=k % chunk == 0,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        SPLIT=split_k > 1,
        DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    k: int,
    sym_zero: int = 0,
    magic: bool = True,
) -> torch.Tensor:
    """The `repack`ed weight -> W^T [K, N] in scales' dtype, for a dense GEMM at large M."""
    n = scales.shape[1]
    _check(scales.new_empty(0, k), qweight, scales, zeros, bits, group_size, k, KS)
    out = scales.new_empty(k, n)
    block_n = 128
    grid = (triton.cdiv(k, (32 // bits) * KS), triton.cdiv(n, block_n))
    _wna16_dequant_kernel[grid](
        qweight,
        scales,
        scales if zeros is None else zeros,
        out,
        n,
        k,
        scales.shape[0],
        BITS=bits,
        KS=KS,
        GROUP=min(group_size, k),
        HAS_ZEROS=zeros is not None,
        SYM_ZERO=sym_zero,
        MAGIC=magic_offset(scales.dtype, bits) if magic else 0,
        BLOCK_N=block_n,
        num_warps=4,
    )
    return out


__all__ = ["KS", "dequantize", "default_config", "magic_offset", "num_sms", "repack", "wna16_gemm"]
