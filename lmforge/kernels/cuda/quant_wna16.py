"""Weight-only quantized GEMM (W4A16 / W8A16): y = x @ dequant(qweight) + bias, dequantized in registers.

Weight layout (made once by `repack`, from the canonical GPTQ-style [K // p, N] int32 with p = 32 // bits values
per word along K): K is cut into chunks of CH = p * KS rows; inside a chunk, word row i of column n holds, in its
j-th `bits`-wide field, the weight of k = chunk * CH + j * KS + i. So field j of a [KS, BLOCK_N] word tile is a
[KS, BLOCK_N] weight tile of KS consecutive k: the kernel shifts and masks it and feeds it straight to a dot with
x[:, k .. k + KS], no reshape or gather. Words along N are contiguous (16-byte loads across a warp).

Codes become floats by OR-ing their bits into the mantissa of a power of two MAGIC (1024 for fp16, 128 for 4-bit
bf16): MAGIC + q exactly, one logic op instead of an int-to-float conversion; on CUDA an inline-PTX block does two
codes per 32-bit op (`unpack_asm`). Scales and zero points stay [K // G, N] in the activation dtype. Where a chunk
lies in one group (G a multiple of CH), the products use the raw codes and the chunk's scale and zero point are
applied once per output (FOLD: s * (sum_k x (MAGIC + q) - (MAGIC + z) * sum_k x)); else each weight is
dequantized, (q - z) * s in the activation dtype (q - z is an exact small integer there). One row is a GEMV
(per-element fp32 products, no tensor cores), up to 16 rows one 16-row dot tile; both split K over programs
(quant_common.store_tile). Large M instead dequantizes the whole weight once per call for cuBLAS (`dequantize`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dot_precision, stable_cache_keys
from .quant_common import num_sms, pick_split_k, splitk_locks, splitk_workspace, store_tile

KS = 16  # k rows per bit field of a word tile (the smallest dot K); CH = (32 // bits) * KS k rows per chunk


def magic_offset(dtype: torch.dtype, bits: int) -> int:
    """The float whose mantissa takes q's bits (0 when the dtype cannot hold 2**bits values above it exactly)."""
    if dtype == torch.float16:
        return 1024
    if dtype == torch.bfloat16 and bits == 4:
        return 128
    return 0


def unpack_asm(bits: int, magic: int) -> str:
    """PTX that splits one word into its fields as 16-bit floats MAGIC + code (`_unpack`), or "" where there is none
    (no magic offset for the dtype, e.g. 8-bit codes in bf16). Field i and field i + p / 2 share one 32-bit op:
    (word >> bits * i) & (mask in both halves) | (the magic float in both halves) is two floats at once."""
    if magic not in (128, 1024) or (bits == 8 and magic != 1024):
        return ""
    magic2 = "0x43004300" if magic == 128 else "0x64006400"
    half = 32 // bits // 2
    mask2 = "0x000F000F" if bits == 4 else "0x00FF00FF"
    lines = ["{", f".reg .b32 t<{half}>;"]
    lines += [f"shr.u32 t{i}, ${2 * half}, {bits * i};" for i in range(1, half)]
    lines.append(f"lop3.b32 t0, ${2 * half}, {mask2}, {magic2}, 0xEA;")  # 0xEA: (a & b) | c
    lines += [f"lop3.b32 t{i}, t{i}, {mask2}, {magic2}, 0xEA;" for i in range(1, half)]
    lines += [f"mov.b32 {{${i}, ${i + half}}}, t{i};" for i in range(half)]
    lines.append("}")
    return "\n".join(lines)


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
def _unpack(q, BITS: tl.constexpr, MAGIC: tl.constexpr, UNPACK_ASM: tl.constexpr, DTYPE: tl.constexpr):
    """Word tile q [KS, BLOCK_N] int32 -> the tuple of its 32 // BITS fields as MAGIC + code in DTYPE. With
    UNPACK_ASM (PTX, `unpack_asm`), each word becomes two fields per 32-bit logic op (two 16-bit floats at once)."""
    if UNPACK_ASM != "":
        if BITS == 4:
            f = tl.inline_asm_elementwise(
                UNPACK_ASM,
                "=h,=h,=h,=h,=h,=h,=h,=h,r",
                [q],
                dtype=(tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16),
                is_pure=True,
                pack=1,
            )
            return (
                f[0].to(DTYPE, bitcast=True),
                f[1].to(DTYPE, bitcast=True),
                f[2].to(DTYPE, bitcast=True),
                f[3].to(DTYPE, bitcast=True),
                f[4].to(DTYPE, bitcast=True),
                f[5].to(DTYPE, bitcast=True),
                f[6].to(DTYPE, bitcast=True),
                f[7].to(DTYPE, bitcast=True),
            )
        else:
            f = tl.inline_asm_elementwise(
                UNPACK_ASM, "=h,=h,=h,=h,r", [q], dtype=(tl.int16, tl.int16, tl.int16, tl.int16), is_pure=True, pack=1
            )
            return (
                f[0].to(DTYPE, bitcast=True),
                f[1].to(DTYPE, bitcast=True),
                f[2].to(DTYPE, bitcast=True),
                f[3].to(DTYPE, bitcast=True),
            )
    else:
        MASK: tl.constexpr = (1 << BITS) - 1
        if BITS == 4:
            return (
                _codes(q, MASK, MAGIC, DTYPE),
                _codes(q >> 4, MASK, MAGIC, DTYPE),
                _codes(q >> 8, MASK, MAGIC, DTYPE),
                _codes(q >> 12, MASK, MAGIC, DTYPE),
                _codes(q >> 16, MASK, MAGIC, DTYPE),
                _codes(q >> 20, MASK, MAGIC, DTYPE),
                _codes(q >> 24, MASK, MAGIC, DTYPE),
                _codes(q >> 28, MASK, MAGIC, DTYPE),
            )
        else:
            return (
                _codes(q, MASK, MAGIC, DTYPE),
                _codes(q >> 8, MASK, MAGIC, DTYPE),
                _codes(q >> 16, MASK, MAGIC, DTYPE),
                _codes(q >> 24, MASK, MAGIC, DTYPE),
            )


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
    UNPACK_ASM: tl.constexpr,
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
    kc = tl.arange(0, CH)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    q_ptrs = qw_ptr + ki[:, None] * N + cols[None, :]
    num_chunks = tl.cdiv(K, CH)
    c_start = pid_k * chunks_per_split
    c_end = tl.minimum(c_start + chunks_per_split, num_chunks)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    zero = tl.full([1, BLOCK_N], SYM_ZERO + MAGIC, dtype=dtype)
    if not USE_DOT:  # GEMV (BLOCK_M == 1): per-element sums, reduced over KS once at the end
        acc_2d = tl.zeros([KS, BLOCK_N], dtype=tl.float32)
    for c in range(c_start, c_end):
        if EVEN_N:
            q = tl.load(q_ptrs + c * (KS * N))
        else:
            q = tl.load(q_ptrs + c * (KS * N), mask=col_mask[None, :], other=0)
        codes = _unpack(q, BITS, MAGIC, UNPACK_ASM, dtype)
        if SCALE_PER_CHUNK:
            g = tl.minimum((c * CH) // GROUP, num_groups - 1)
            s, z = _group_params(s_ptr, z_ptr, g, N, cols, col_mask, zero, HAS_ZEROS, MAGIC, EVEN_N)
        if FOLD:
            # sum_k x (q - z) s = s (sum_k x (MAGIC + q) - (MAGIC + z) sum_k x): the codes go to the products as
            # they are, the chunk's scale and zero point are applied once per output element
            if EVEN_K:
                x_chunk = tl.load(x_rows + c * CH + kc[None, :], mask=row_mask[:, None], other=0.0)
            else:
                x_chunk = tl.load(
                    x_rows + c * CH + kc[None, :], mask=row_mask[:, None] & (c * CH + kc < K)[None, :], other=0.0
                )
            x_sum = tl.sum(x_chunk.to(tl.float32), axis=1)  # [BLOCK_M]
            if USE_DOT:
                part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            else:
                part = tl.zeros([KS, BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(P):
            k0 = c * CH + j * KS
            if not SCALE_PER_CHUNK:
                g = tl.minimum(k0 // GROUP, num_groups - 1)
                s, z = _group_params(s_ptr, z_ptr, g, N, cols, col_mask, zero, HAS_ZEROS, MAGIC, EVEN_N)
            if EVEN_K:
                x = tl.load(x_rows + k0 + ki[None, :], mask=row_mask[:, None], other=0.0)
            else:
                x = tl.load(x_rows + k0 + ki[None, :], mask=row_mask[:, None] & ((k0 + ki) < K)[None, :], other=0.0)
            if FOLD:
                if USE_DOT:
                    part = tl.dot(x, codes[j], part, input_precision=DOT_PRECISION)
                else:
                    part += codes[j].to(tl.float32) * tl.reshape(x, [KS, 1]).to(tl.float32)
            else:
                w = (codes[j] - z) * s
                if USE_DOT:
                    acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
                else:
                    acc_2d += w.to(tl.float32) * tl.reshape(x, [KS, 1]).to(tl.float32)
        if FOLD:
            if USE_DOT:
                acc += (part - x_sum[:, None] * z.to(tl.float32)) * s.to(tl.float32)
            else:  # the zero-point term goes to row 0 of the per-element sums
                first = (ki == 0).to(tl.float32)[:, None]
                acc_2d += (part - first * x_sum[:, None] * z.to(tl.float32)) * s.to(tl.float32)
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
    """Tiles by M: one row a GEMV (no tensor cores: per-element products, no layout shuffle for a dot operand);
    up to 16 rows one 16-row dot tile; both split K over programs to fill the GPU. More rows: 32- to 128-row tiles.
    ASM: unpack codes with the PTX of `unpack_asm` (CUDA only). FOLD: scales after the sums of raw codes.
    Measured on an H200 (benchmarks/quant.py --sweep, llama-8b projections): the GEMV with 128 columns and about
    3.4 waves of programs (448) was the fastest of the swept tiles and splits for each projection."""
    chunks = triton.cdiv(k, (32 // bits) * KS)
    waves = 3.0
    if m == 1:
        cfg = dict(BLOCK_M=1, BLOCK_N=128, USE_DOT=False, num_warps=4, num_stages=3)
        waves = 3.4
    elif m <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=128 if n >= 4096 else 64, USE_DOT=True, num_warps=4, num_stages=4)
    elif m <= 64:
        cfg = dict(BLOCK_M=32 if m <= 32 else 64, BLOCK_N=128, USE_DOT=True, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=64 if m <= 128 else 128, BLOCK_N=128, USE_DOT=True, num_warps=8, num_stages=3)
    cfg.update(ASM=True, FOLD=True)
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    cfg["SPLIT_K"] = pick_split_k(tiles, chunks, device, waves=waves)
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
    mag = magic_offset(x.dtype, bits) if magic else 0
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
        MAGIC=mag,
        UNPACK_ASM=unpack_asm(bits, mag) if cfg["ASM"] and x.is_cuda else "",
        USE_DOT=cfg["USE_DOT"],
        FOLD=cfg["FOLD"] and scale_per_chunk,
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


__all__ = ["KS", "dequantize", "default_config", "magic_offset", "num_sms", "repack", "unpack_asm", "wna16_gemm"]


stable_cache_keys(globals())
