"""Small Triton helpers shared by several kernels."""

import os

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
# finite start for running maxima: a fully masked chunk then gives exp2(-inf - NEG_BIG) = 0 instead of NaN
NEG_BIG = tl.constexpr(-1.0e30)
# quantized KV caches (lmforge.backends.cpu.attention defines the formats): the largest finite float8_e4m3fn
# value, and the smallest (max - min) range of an int8/int4 row, so a constant row gets a finite scale
FP8_E4M3_MAX = tl.constexpr(448.0)
QUANT_MIN_RANGE = tl.constexpr(1.0e-6)
# inline PTX where it helps; the interpreter (TRITON_INTERPRET=1) runs the plain-Triton equivalent
ASM = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def tanh(x):
    # exp-based so it runs on every Triton backend (interpreter included); saturates to +-1 without NaN
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def load_kv_codes(
    cache_ptr,
    rows,
    row_mask,
    col0,
    num_cols,
    stride_d,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr,
    MASK_COLS: tl.constexpr,
):
    """Channels col0 + [0, BLOCK_D) (those < num_cols when MASK_COLS) of BLOCK_N cached key/value rows, as stored:
    the values of a plain (or float8) cache, the uint8 codes of an int8 one, int4 bytes c unpacked into channels
    2c, 2c + 1. rows [BLOCK_N]: offsets of each row in the cache (same head). Masked rows read as zeros."""
    if QUANT == 4:
        c = col0 // 2 + tl.arange(0, BLOCK_D // 2)
        mask = row_mask[:, None]
        if MASK_COLS:
            mask = mask & (c[None, :] * 2 < num_cols)
        packed = tl.load(cache_ptr + rows[:, None] + c[None, :] * stride_d, mask=mask, other=0)
        return tl.join(packed & 15, packed >> 4).reshape(BLOCK_N, BLOCK_D)
    c = col0 + tl.arange(0, BLOCK_D)
    mask = row_mask[:, None]
    if MASK_COLS:
        mask = mask & (c[None, :] < num_cols)
    return tl.load(cache_ptr + rows[:, None] + c[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def load_scales_zeros(sz_ptr, sz_rows, row_mask):
    """(scale, zero point) [BLOCK_N] float32 of quantized rows (one 8-byte load each); masked rows read (0, 0)."""
    pair = tl.load(sz_ptr + sz_rows[:, None] + tl.arange(0, 2)[None, :], mask=row_mask[:, None], other=0.0)
    return tl.split(pair)


@triton.jit
def codes_as_dot_operand(c, dtype: tl.constexpr):
    """Integer codes c (uint8, < 1024) as dot operands: float16 1024 + c built from the bits (0x6400 is 1024.0 and
    c fills the low mantissa bits), so no int -> float conversion instruction (a quarter-rate unit on the GPU) runs
    per element; float32 (exact dots for float32 models) converts them."""
    if dtype == tl.float16:
        if ASM:  # four codes a register: two byte permutes give four float16 (an asm op also stays where it is,
            # in the load's layout, so Triton does not move it behind a byte-wise gather of the dot operand)
            return tl.inline_asm_elementwise(
                "prmt.b32 $0, $2, 0x64646464, 0x4140; prmt.b32 $1, $2, 0x64646464, 0x4342;",
                "=r,=r,r",
                [c],
                dtype=tl.float16,
                is_pure=True,
                pack=4,
            )
        return (c.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
    return c.to(dtype)


@triton.jit
def quantized_query(q1, q2, BLOCK_D2: tl.constexpr):
    """(q1, q2, q_sum, q_scale) for scoring quantized keys: float16 rows q / q_scale (q_scale [BLOCK_M] a power of two
    near each row's largest |q|, so a bfloat16 query converts exactly and cannot overflow float16), and q_sum the
    sum of those float16 rows over the head's channels. A float32 query stays float32 (q_scale 1)."""
    if q1.dtype == tl.float32:
        q_scale = tl.full([q1.shape[0]], 1.0, tl.float32)
        qa1, qa2 = q1, q2
    else:
        q_max = tl.max(tl.abs(q1.to(tl.float32)), axis=1)
        if BLOCK_D2 > 0:
            q_max = tl.maximum(q_max, tl.max(tl.abs(q2.to(tl.float32)), axis=1))
        # the power of two at or below q_max: its float32 exponent bits alone
        q_scale = (tl.maximum(q_max, 1.0e-30).to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
        inv = 1.0 / q_scale
        qa1 = (q1.to(tl.float32) * inv[:, None]).to(tl.float16)
        qa2 = (q2.to(tl.float32) * inv[:, None]).to(tl.float16)
    q_sum = tl.sum(qa1.to(tl.float32), axis=1)
    if BLOCK_D2 > 0:
        q_sum += tl.sum(qa2.to(tl.float32), axis=1)
    return qa1, qa2, q_sum, q_scale


@triton.jit
def attn_scores(
    q1,
    q2,
    q_sum,
    q_scale,
    k_ptr,
    k_sz_ptr,
    k_rows,
    sz_rows,
    row_mask,
    head_dim,
    stride_d,
    BLOCK_N: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    QUANT: tl.constexpr,
    FACTORED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """q . k [BLOCK_M, BLOCK_N] float32 of query rows q1 (channels [0, BLOCK_D1)) / q2 (the tail) against BLOCK_N
    cached keys, and the keys' leading tile as stored (MLA reuses it as the values).

    Quantized keys (QUANT 8 / 4): q1, q2, q_sum, q_scale come from quantized_query. A key k = (c - z) * s enters the
    dot as its integer codes, as float16 1024 + c (exact), and the row's scale and zero point are applied to the
    score: q . k = s * q_scale * (q' . (1024 + c) - (z + 1024) * sum(q')). So a loaded element costs two integer
    operations, not a conversion and a float dequantization. FACTORED False: the keys are dequantized as they load
    instead and q1 / q2 are the query as it is (prefill: there the [BLOCK_M, BLOCK_N] score corrections of many
    query rows cost more than dequantizing a tile of keys, measured on an H200)."""
    # one if / elif chain, no early returns: Triton still type-checks the code after a returning constexpr branch
    k1 = load_kv_codes(k_ptr, k_rows, row_mask, 0, head_dim, stride_d, BLOCK_N, BLOCK_D1, QUANT, False)
    if QUANT == 0:
        s = tl.dot(q1, tl.trans(k1.to(q1.dtype)), input_precision=DOT_PRECISION)
        if BLOCK_D2 > 0:
            k2 = load_kv_codes(k_ptr, k_rows, row_mask, BLOCK_D1, head_dim, stride_d, BLOCK_N, BLOCK_D2, QUANT, True)
            s = tl.dot(q2, tl.trans(k2.to(q2.dtype)), s, input_precision=DOT_PRECISION)
    elif not FACTORED:  # the keys dequantized as they load, for a plain dot with q as it is
        scale, zero = load_scales_zeros(k_sz_ptr, sz_rows, row_mask)
        k1 = (k1.to(tl.float32) - zero[:, None]) * scale[:, None]
        s = tl.dot(q1, tl.trans(k1.to(q1.dtype)), input_precision=DOT_PRECISION)
        if BLOCK_D2 > 0:
            k2 = load_kv_codes(k_ptr, k_rows, row_mask, BLOCK_D1, head_dim, stride_d, BLOCK_N, BLOCK_D2, QUANT, True)
            k2 = (k2.to(tl.float32) - zero[:, None]) * scale[:, None]
            s = tl.dot(q2, tl.trans(k2.to(q2.dtype)), s, input_precision=DOT_PRECISION)
    else:
        s = tl.dot(q1, tl.trans(codes_as_dot_operand(k1, q1.dtype)), input_precision=DOT_PRECISION)
        if BLOCK_D2 > 0:
            k2 = load_kv_codes(k_ptr, k_rows, row_mask, BLOCK_D1, head_dim, stride_d, BLOCK_N, BLOCK_D2, QUANT, True)
            s = tl.dot(q2, tl.trans(codes_as_dot_operand(k2, q2.dtype)), s, input_precision=DOT_PRECISION)
        scale, zero = load_scales_zeros(k_sz_ptr, sz_rows, row_mask)
        if q1.dtype == tl.float16:
            zero += 1024.0
        s = (s - q_sum[:, None] * zero[None, :]) * (q_scale[:, None] * scale[None, :])
    return s, k1


@triton.jit
def attn_values(
    acc,
    p,
    q,
    v_ptr,
    v_sz_ptr,
    v_rows,
    sz_rows,
    row_mask,
    v_dim,
    stride_d,
    BLOCK_N: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    QUANT: tl.constexpr,
    FACTORED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """acc [BLOCK_M, BLOCK_DV] float32 + p @ v, for softmax weights p [BLOCK_M, BLOCK_N] float32; the dot runs in the
    dtype of the query tile q (plain caches).

    A quantized value v = (c - z) * s: p @ v = (p * s) @ c - sum(p * s * z), the codes going to the dot as float16
    1024 + c (float32 for a float32 q) and the zero point shifted to match. p * s is divided by the chunk's largest
    scale first (the result multiplied back), so it cannot fall into float16's subnormals; the correction sums
    the rounded weights the dot used. FACTORED False: the values are dequantized as they load (prefill)."""
    v = load_kv_codes(v_ptr, v_rows, row_mask, 0, v_dim, stride_d, BLOCK_N, BLOCK_DV, QUANT, True)
    if QUANT == 0:
        if FACTORED and v.dtype == tl.float8e4nv:  # decode over a float8 cache: transposed, as below
            acc += tl.trans(tl.dot(tl.trans(v.to(q.dtype)), tl.trans(p.to(q.dtype)), input_precision=DOT_PRECISION))
        else:
            acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc, input_precision=DOT_PRECISION)
    else:
        scale, zero = load_scales_zeros(v_sz_ptr, sz_rows, row_mask)
        if not FACTORED:
            v = (v.to(tl.float32) - zero[:, None]) * scale[:, None]
            acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc, input_precision=DOT_PRECISION)
        elif q.dtype == tl.float32:
            w = p * scale[None, :]
            acc += (
                tl.dot(w, v.to(tl.float32), input_precision=DOT_PRECISION) - tl.sum(w * zero[None, :], axis=1)[:, None]
            )
        else:
            top = tl.maximum(tl.max(scale, axis=0), 1.0e-30)
            w = (p * (scale * (1.0 / top))[None, :]).to(tl.float16)
            # as (v^T w^T)^T: the head's channels become the dot's M (64+: a Hopper warpgroup MMA), and the codes,
            # converted in the registers they load into, reach it through a float16 tile in shared memory (a
            # transposing ldmatrix) instead of one byte-wide shared-memory gather per element (measured on an H200)
            pv = tl.dot(tl.trans(codes_as_dot_operand(v, tl.float16)), tl.trans(w), input_precision=DOT_PRECISION)
            pv = tl.trans(pv) - tl.sum(w.to(tl.float32) * (zero + 1024.0)[None, :], axis=1)[:, None]
            acc += pv * top
    return acc


def check_out(out: torch.Tensor | None, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A caller-given output buffer (a CUDA-graph static buffer, a poisoned test buffer) or a new one."""
    if out is None:
        return like.new_empty(shape)
    if tuple(out.shape) != shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"out must be {like.dtype} {shape} on {like.device}, got {out.dtype} {tuple(out.shape)}")
    return out


def dot_precision(dtype: torch.dtype) -> str:
    """float32 models get exact float32 dots; tf32 would cost them ~3 decimal digits. Other dtypes ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def split_head_dim(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D1, BLOCK_D2): a power-of-two head and a tail block (0 if none; at least 16, the smallest dot K).

    Padding a head dim to the next power of two wastes up to half the loads and dots: MLA's 576 would become
    1024 and no longer fit in shared memory. Split, 576 = 512 + 64, 96 = 64 + 32, 40 = 32 + 16 (8 used)."""
    block_d1 = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - block_d1
    return block_d1, (max(16, 1 << (rest - 1).bit_length()) if rest else 0)


def kv_quant_args(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scales_zeros: torch.Tensor | None,
    v_scales_zeros: torch.Tensor | None,
    quant_bits: int,
) -> tuple[tuple[int, int], torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """((k_dim, v_dim) in channels, k / v scales_zeros pointers, their 3 leading strides) of a paged cache, checked:
    quant_bits 0 reads a plain cache (any float dtype, float8_e4m3fn included), 8 / 4 a uint8 one of packed codes."""
    if quant_bits == 0:
        return (k_cache.shape[-1], v_cache.shape[-1]), k_cache, k_cache, (0, 0, 0)
    if quant_bits not in (4, 8) or k_cache.dtype != torch.uint8 or v_cache.dtype != torch.uint8:
        raise ValueError(f"quant_bits {quant_bits} needs uint8 caches (4 or 8 bits), got {k_cache.dtype}")
    for sz, cache, name in ((k_scales_zeros, k_cache, "k"), (v_scales_zeros, v_cache, "v")):
        if sz is None or sz.dtype != torch.float32 or sz.shape != (*cache.shape[:3], 2) or sz.stride(-1) != 1:
            raise ValueError(f"{name}_scales_zeros must be float32 {(*cache.shape[:3], 2)} with unit last stride")
    if k_scales_zeros.stride() != v_scales_zeros.stride():
        raise ValueError("k_scales_zeros and v_scales_zeros must have the same strides")
    dims = (k_cache.shape[-1] * 8 // quant_bits, v_cache.shape[-1] * 8 // quant_bits)
    return dims, k_scales_zeros, v_scales_zeros, k_scales_zeros.stride()[:3]


def shares_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, v_dim: int, block_d1: int) -> bool:
    """True when the values are the leading block_d1 channels of the key cache itself (MLA's latent cache):
    then the kernels reuse the key tile as the value tile instead of loading the same bytes twice."""
    return v_cache.data_ptr() == k_cache.data_ptr() and v_cache.stride() == k_cache.stride() and v_dim == block_d1


def stable_cache_keys(namespace: dict) -> None:
    """Compute the Triton cache key of every JIT function in a module's namespace, in definition order, as the
    module finishes importing. Triton (3.6) folds a callee's globals into a kernel's key only when the callee's own
    key already exists, so without this a kernel's key depends on which kernel of the process compiled first, and a
    warm disk cache misses (H200: decode and prefill attention recompiled on every start, ~4 s). Every module calls
    it last; modules import their helpers' modules first, so helpers always have their keys before their callers."""
    for value in list(namespace.values()):
        if isinstance(value, triton.runtime.jit.JITFunction):
            value.cache_key  # noqa: B018 (computed and kept by Triton)


stable_cache_keys(globals())
