"""Batch-1 (and few-row) W4A16 GEMV over a column-major int4 layout: y = x @ dequant(qweight), fp32 sums.

Layout (made once by `repack_gemv` from the canonical GPTQ-style [K // 8, N] int32): [N, K // 8] int32, each
column's words contiguous along K. K is cut into tiles of 128 (TK) k; tile t of column n is 16 words, and word w
(0..15) holds in its 4-bit field f (0..7) the code of k = t * 128 + 32 * (w // 4) + 4 * f + (w % 4). A program loads
a [BLOCK_N, 4, 4] word tile per K tile (16 contiguous bytes per thread, one column per 16-byte vector); for each
field f the four words of a vector cover four consecutive k, so x comes as one 8-byte vector per field.

Codes become fp32 without a conversion: a field moved to bits 16..19 (or 12..15) of a word and OR-ed into the
exponent of 128.0f (or 2048.0f) is the float 128 + q (2048 + q) exactly, one lop3 per code and one shift per two
codes (`UNPACK_ASM`). The sums run over those raw values and the group algebra takes the offsets and the zero point
out of the inner loop: with T = sum_k x_k (M_k + q_k), sum_k x_k (q_k - z) s = s (T - sum_k x_k M_k - z sum_k x_k),
where the two x sums are per K tile and per thread, not per column. So per code: one lop3, one FMA and 3/8 of a
shift. The scale group must be a multiple of 128 (or the whole K). K is split over programs (split-K, the shared
deterministic epilogue of quant_common.store_tile).

The same layout serves more rows through quant_w4dot's `w4_dot` (tensor cores) and a dense GEMM at large M through
its `w4_dequantize`, so one copy of the weight serves every batch size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import stable_cache_keys
from .quant_common import pick_split_k, splitk_locks, splitk_workspace, store_tile

TK = 128  # k per K tile (16 words of one column)

# word -> eight fp32 values: field f as (128 + q) for even f, (2048 + q) for odd f. 128.0f = 0x43000000 takes a code
# at bits 16..19 into its mantissa unit 1, 2048.0f = 0x45000000 one at bits 12..15.
UNPACK_ASM = tl.constexpr("""{
.reg .b32 a, b, c;
shl.b32 a, $8, 8;
shr.u32 b, $8, 8;
shf.l.wrap.b32 c, $8, $8, 16;
lop3.b32 $0, c, 0x000F0000, 0x43000000, 0xEA;
lop3.b32 $1, a, 0x0000F000, 0x45000000, 0xEA;
lop3.b32 $2, a, 0x000F0000, 0x43000000, 0xEA;
lop3.b32 $3, $8, 0x0000F000, 0x45000000, 0xEA;
lop3.b32 $4, $8, 0x000F0000, 0x43000000, 0xEA;
lop3.b32 $5, b, 0x0000F000, 0x45000000, 0xEA;
lop3.b32 $6, b, 0x000F0000, 0x43000000, 0xEA;
lop3.b32 $7, c, 0x0000F000, 0x45000000, 0xEA;
}""")
MAGIC_EVEN = 128.0
MAGIC_ODD = 2048.0


def gemv_supported(bits: int, group_size: int, k: int) -> bool:
    """Whether a weight takes this layout: 4-bit, K whole tiles, scale groups of whole tiles (or per channel)."""
    return bits == 4 and k % TK == 0 and (group_size >= k or group_size % TK == 0)


def repack_gemv(qweight: torch.Tensor) -> torch.Tensor:
    """Canonical 4-bit [K // 8, N] int32 -> [N, K // 8] int32 in the layout of the module docstring."""
    rows, n = qweight.shape
    k = rows * 8
    if k % TK:
        raise ValueError(f"the GEMV layout needs K a multiple of {TK}, got {k}")
    shifts = torch.arange(8, device=qweight.device, dtype=torch.int32) * 4
    q = ((qweight[:, None, :] >> shifts[None, :, None]) & 15).reshape(k, n)  # codes [K, N]
    # k = t * 128 + 32 * a + 4 * f + b with word w = 4 * a + b: [t, a, f, b, n] -> [n, t, a, b, f]
    q = q.view(k // TK, 4, 8, 4, n).permute(4, 0, 1, 3, 2)
    shifts = shifts.view(1, 1, 1, 1, 8)
    packed = (q << shifts).sum(dim=-1, dtype=torch.int64)  # disjoint fields: the sum is the OR
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed.reshape(n, k // 8).contiguous()


def unpack_gemv(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `repack_gemv` for tests: [N, K // 8] int32 -> codes [K, N] int32."""
    n, words = packed.shape
    k = words * 8
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32) * 4
    q = (packed.view(n, k // TK, 4, 4, 1) >> shifts) & 15  # [n, t, a, b, f]
    return q.permute(1, 2, 4, 3, 0).reshape(k, n)


@triton.jit
def _fields(q, ASM: tl.constexpr):
    """Word tile -> its eight fields as fp32 (128 + q) (even fields) / (2048 + q) (odd fields)."""
    if ASM:
        f = tl.inline_asm_elementwise(
            UNPACK_ASM,
            "=r,=r,=r,=r,=r,=r,=r,=r,r",
            [q],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32),
            is_pure=True,
            pack=1,
        )
        return f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7]
    else:
        return (
            ((q << 16) & 0x000F0000 | 0x43000000).to(tl.float32, bitcast=True),
            ((q << 8) & 0x0000F000 | 0x45000000).to(tl.float32, bitcast=True),
            ((q << 8) & 0x000F0000 | 0x43000000).to(tl.float32, bitcast=True),
            (q & 0x0000F000 | 0x45000000).to(tl.float32, bitcast=True),
            (q & 0x000F0000 | 0x43000000).to(tl.float32, bitcast=True),
            ((q >> 8) & 0x0000F000 | 0x45000000).to(tl.float32, bitcast=True),
            ((q >> 8) & 0x000F0000 | 0x43000000).to(tl.float32, bitcast=True),
            ((q >> 16) & 0x0000F000 | 0x45000000).to(tl.float32, bitcast=True),
        )


@triton.jit
def _scale_zero(
    s_ptr,
    z_ptr,
    t,
    N,
    cols,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    SYM_ZERO: tl.constexpr,
    EVEN_N: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Scale and zero point of K tile t's group for the columns, fp32 (loaded after the sums: shorter lifetimes)."""
    TK: tl.constexpr = 128
    g = (t * TK) // GROUP
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
    return s, z


@triton.jit
def _x4(xt):
    return (
        tl.load(xt).to(tl.float32),
        tl.load(xt + 4).to(tl.float32),
        tl.load(xt + 8).to(tl.float32),
        tl.load(xt + 12).to(tl.float32),
        tl.load(xt + 16).to(tl.float32),
        tl.load(xt + 20).to(tl.float32),
        tl.load(xt + 24).to(tl.float32),
        tl.load(xt + 28).to(tl.float32),
    )


@triton.jit
def _x_sums(x):
    x_even = x[0] + x[2] + x[4] + x[6]
    x_odd = x[1] + x[3] + x[5] + x[7]
    x_sum = tl.sum(tl.sum(x_even + x_odd, axis=2), axis=1)
    x_magic = tl.sum(tl.sum(x_even * 128.0 + x_odd * 2048.0, axis=2), axis=1)
    return x_sum, x_magic


@triton.jit
def _two_row_sums(f, xa, xb):
    """Two rows' per-column sums, each code used by both rows before the next (short register lifetimes)."""
    pa = f[0] * xa[0]
    pb = f[0] * xb[0]
    pa += f[1] * xa[1]
    pb += f[1] * xb[1]
    pa += f[2] * xa[2]
    pb += f[2] * xb[2]
    pa += f[3] * xa[3]
    pb += f[3] * xb[3]
    pa += f[4] * xa[4]
    pb += f[4] * xb[4]
    pa += f[5] * xa[5]
    pb += f[5] * xb[5]
    pa += f[6] * xa[6]
    pb += f[6] * xb[6]
    pa += f[7] * xa[7]
    pb += f[7] * xb[7]
    return tl.sum(tl.sum(pa, axis=2), axis=1), tl.sum(tl.sum(pb, axis=2), axis=1)


@triton.jit
def _w4_gemv_kernel(
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
    ASM: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    num_n = tl.cdiv(N, BLOCK_N)
    TK: tl.constexpr = 128
    n3 = tl.arange(0, BLOCK_N)[:, None, None]
    a3 = tl.arange(0, 4)[None, :, None]
    b3 = tl.arange(0, 4)[None, None, :]
    cols3 = pid_n * BLOCK_N + n3
    words = K // 8
    # [BLOCK_N, 4, 4] words of one K tile: column, 16-byte vector a, word b in it
    q_ptrs = qw_ptr + cols3.to(tl.int64) * words + (a3 * 4 + b3)
    # field f of word (a, b) is k = 32 a + 4 f + b of the tile; x pointers broadcast over the columns with a zero
    # stride, so that they take the words' layout (each thread loads the x of its own k, no shuffle)
    row0 = pid_m * BLOCK_M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    num_tiles = tl.cdiv(K, TK)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, num_tiles)
    # rows past M (in the last row block) repeat row M - 1, and their outputs are not stored
    x_off = (a3 * 32 + b3) + n3 * 0
    x_row0 = x_ptr + row0.to(tl.int64) * stride_xm + x_off
    x_row1 = x_ptr + tl.minimum(row0 + 1, M - 1).to(tl.int64) * stride_xm + x_off
    acc0 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    if PREFETCH:  # the next K tile's words are loaded before this one is computed (registers double-buffered)
        q_next = tl.load(q_ptrs + t_start * 16, mask=cols3 < N, other=0)
    for t in range(t_start, t_end):
        if PREFETCH:
            q = q_next
            q_next = tl.load(q_ptrs + tl.minimum(t + 1, t_end - 1) * 16, mask=cols3 < N, other=0)
        elif EVEN_N:
            q = tl.load(q_ptrs + t * 16)
        else:
            q = tl.load(q_ptrs + t * 16, mask=cols3 < N, other=0)
        f = _fields(q, ASM)
        xa = _x4(x_row0 + t * TK)
        xa_sum, xa_magic = _x_sums(xa)
        if BLOCK_M == 1:
            part = f[0] * xa[0]
            part += f[1] * xa[1]
            part += f[2] * xa[2]
            part += f[3] * xa[3]
            part += f[4] * xa[4]
            part += f[5] * xa[5]
            part += f[6] * xa[6]
            part += f[7] * xa[7]
            sums = tl.sum(tl.sum(part, axis=2), axis=1)  # [BLOCK_N], within a thread
            s, z = _scale_zero(s_ptr, z_ptr, t, N, cols, GROUP, HAS_ZEROS, SYM_ZERO, EVEN_N, BLOCK_N)
            acc0 += s * (sums - xa_magic - z * xa_sum)
        else:
            xb = _x4(x_row1 + t * TK)
            xb_sum, xb_magic = _x_sums(xb)
            sa, sb = _two_row_sums(f, xa, xb)
            s, z = _scale_zero(s_ptr, z_ptr, t, N, cols, GROUP, HAS_ZEROS, SYM_ZERO, EVEN_N, BLOCK_N)
            acc0 += s * (sa - xa_magic - z * xa_sum)
            acc1 += s * (sb - xb_magic - z * xb_sum)
    rows = row0 + tl.arange(0, BLOCK_M)
    if BLOCK_M == 1:
        y = acc0[None, :]
    else:
        y = tl.join(acc0, acc1).permute(1, 0)
    store_tile(
        y,
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


def gemv_config(m: int, n: int, k: int, device: torch.device) -> dict:
    """One row per program (BLOCK_M=2 unpacks each code once for two rows), BLOCK_N columns per program (BLOCK_N /
    (32 num_warps) per thread), split-K for about `waves` waves of programs. H200 (benchmarks/w4gemv_bench.py sweep,
    llama-8b projections): 2 warps, 512 columns for the wide gate_up, 256 for the others."""
    cfg = dict(BLOCK_M=1, BLOCK_N=512 if n >= 16384 else 256, num_warps=2, num_stages=1, waves=4.0)
    return cfg


def w4_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    sym_zero: int = 8,
    config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] @ dequant(qweight) -> [M, N] in x's dtype (meant for M <= 4). qweight is `repack_gemv`ed
    [N, K // 8]; scales / zeros [K // G, N] in x's dtype; zeros None: the constant sym_zero."""
    m, k = x.shape
    n = scales.shape[1]
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (n, k // 8):
        raise ValueError(f"qweight must be the GEMV-layout int32 [{n}, {k // 8}], got {qweight.dtype} {qweight.shape}")
    group = min(group_size, k)
    if not gemv_supported(4, group, k) or tuple(scales.shape) != (k // group, n):
        raise ValueError(f"w4_gemv: K={k} / group {group_size} / scales {tuple(scales.shape)} do not fit the layout")
    if x.stride(1) != 1:
        x = x.contiguous()
    out = x.new_empty(m, n) if out is None else out
    if m == 0:
        return out
    cfg = {**gemv_config(m, n, k, x.device), **(config or {})}
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    if block_m not in (1, 2):
        raise ValueError(f"w4_gemv: BLOCK_M must be 1 or 2, got {block_m}")
    num_tiles = k // TK
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k = cfg.get("SPLIT_K") or pick_split_k(tiles, num_tiles, x.device, min_blocks_per_split=2, waves=cfg["waves"])
    per_split = triton.cdiv(num_tiles, split_k)
    split_k = triton.cdiv(num_tiles, per_split)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
    ws = splitk_workspace(split_k, grid[0] * grid[1], block_m, block_n, x.device)
    _w4_gemv_kernel[grid](
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
        ASM=cfg.get("ASM", True) and x.is_cuda,
        PREFETCH=cfg.get("PREFETCH", False),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


stable_cache_keys(globals())
