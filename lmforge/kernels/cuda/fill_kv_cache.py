"""Scatter this step's keys and values [num_tokens, kv_heads, dim] into the paged cache
[num_blocks, block_size, kv_heads, dim] at the slots of slot_mapping (block_id * block_size + offset).

Quantized caches (quant_bits 8 / 4) are quantized here, per (token, head) row: the row's min and max give an
asymmetric scale and zero point, written to scales_zeros [num_blocks, block_size, kv_heads, 2] float32 beside
the uint8 codes (int4: channels 2i / 2i + 1 in the low / high nibble of byte i). A float8_e4m3fn cache gets the
values clamped to +-448 (scale 1.0). The math matches lmforge.backends.cpu.attention.quantize_kv.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import FP8_E4M3_MAX, QUANT_MIN_RANGE, stable_cache_keys


@triton.jit
def _copy_token(
    src_ptr,
    dst_ptr,
    sz_ptr,
    token,
    block_id,
    offset,
    num_heads,
    dim,
    stride_st,
    stride_sh,
    stride_sd,
    stride_db,
    stride_ds,
    stride_dh,
    stride_dd,
    stride_zb,
    stride_zs,
    stride_zh,
    QUANT: tl.constexpr,
    FP8: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    h_mask = heads < num_heads
    src = src_ptr + token * stride_st + heads[:, None] * stride_sh
    dst = dst_ptr + block_id * stride_db + offset * stride_ds + heads[:, None] * stride_dh
    if QUANT == 0:
        cols = tl.arange(0, BLOCK_D)
        mask = h_mask[:, None] & (cols[None, :] < dim)
        x = tl.load(src + cols[None, :] * stride_sd, mask=mask)
        if FP8:  # the float8 cast of a value past the format's range is not finite
            x = tl.minimum(tl.maximum(x.to(tl.float32), -FP8_E4M3_MAX), FP8_E4M3_MAX)
        tl.store(dst + cols[None, :] * stride_dd, x.to(dst_ptr.dtype.element_ty), mask=mask)
    else:
        qmax: tl.constexpr = (1 << QUANT) - 1
        if QUANT == 8:
            cols = tl.arange(0, BLOCK_D)
            mask = h_mask[:, None] & (cols[None, :] < dim)
            x = tl.load(src + cols[None, :] * stride_sd, mask=mask, other=0.0).to(tl.float32)
            lo = tl.min(tl.where(mask, x, float("inf")), axis=1)
            hi = tl.max(tl.where(mask, x, float("-inf")), axis=1)
        else:  # even channels x, odd channels x2: byte c of the row packs channels 2c and 2c + 1
            cols = tl.arange(0, BLOCK_D // 2)
            mask = h_mask[:, None] & (cols[None, :] * 2 < dim)
            x = tl.load(src + (2 * cols)[None, :] * stride_sd, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(src + (2 * cols + 1)[None, :] * stride_sd, mask=mask, other=0.0).to(tl.float32)
            lo = tl.minimum(
                tl.min(tl.where(mask, x, float("inf")), axis=1), tl.min(tl.where(mask, x2, float("inf")), axis=1)
            )
            hi = tl.maximum(
                tl.max(tl.where(mask, x, float("-inf")), axis=1), tl.max(tl.where(mask, x2, float("-inf")), axis=1)
            )
        lo = tl.where(h_mask, lo, 0.0)
        value_range = tl.maximum(tl.where(h_mask, hi, 0.0) - lo, QUANT_MIN_RANGE)
        # IEEE divisions, as torch computes them: the default float32 division is approximate on the GPU
        inv_scale = tl.div_rn(tl.full([BLOCK_H], qmax, tl.float32), value_range)
        q = tl.floor((x - lo[:, None]) * inv_scale[:, None] + 0.5)
        q = tl.minimum(tl.maximum(q, 0.0), qmax).to(tl.uint8)
        if QUANT == 4:
            q2 = tl.floor((x2 - lo[:, None]) * inv_scale[:, None] + 0.5)
            q = q | (tl.minimum(tl.maximum(q2, 0.0), qmax).to(tl.uint8) << 4)
        tl.store(dst + cols[None, :] * stride_dd, q, mask=mask)
        sz = sz_ptr + block_id * stride_zb + offset * stride_zs + heads * stride_zh
        tl.store(sz, tl.div_rn(value_range, tl.full([BLOCK_H], qmax, tl.float32)), mask=h_mask)
        tl.store(sz + 1, -lo * inv_scale, mask=h_mask)


@triton.jit
def _fill_kv_cache_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_sz_ptr,
    v_sz_ptr,
    slot_ptr,
    block_size,
    num_heads,
    k_dim,
    v_dim,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_kcd,
    stride_vcb,
    stride_vcs,
    stride_vch,
    stride_vcd,
    stride_zb,
    stride_zs,
    stride_zh,
    HAS_VALUE: tl.constexpr,
    QUANT: tl.constexpr,
    FP8: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:  # padding token (e.g. a CUDA-graph batch filled up to its bucket size): nothing to write
        return
    block_id = slot // block_size
    offset = slot % block_size
    _copy_token(
        key_ptr,
        k_cache_ptr,
        k_sz_ptr,
        token,
        block_id,
        offset,
        num_heads,
        k_dim,
        stride_kt,
        stride_kh,
        stride_kd,
        stride_kcb,
        stride_kcs,
        stride_kch,
        stride_kcd,
        stride_zb,
        stride_zs,
        stride_zh,
        QUANT,
        FP8,
        BLOCK_H,
        BLOCK_DK,
    )
    if HAS_VALUE:
        _copy_token(
            value_ptr,
            v_cache_ptr,
            v_sz_ptr,
            token,
            block_id,
            offset,
            num_heads,
            v_dim,
            stride_vt,
            stride_vh,
            stride_vd,
            stride_vcb,
            stride_vcs,
            stride_vch,
            stride_vcd,
            stride_zb,
            stride_zs,
            stride_zh,
            QUANT,
            FP8,
            BLOCK_H,
            BLOCK_DV,
        )


def _check_scales(scales_zeros: torch.Tensor | None, cache: torch.Tensor, name: str) -> None:
    if (
        scales_zeros is None
        or scales_zeros.dtype != torch.float32
        or scales_zeros.shape != (*cache.shape[:3], 2)
        or scales_zeros.stride(-1) != 1
    ):
        got = None if scales_zeros is None else f"{scales_zeros.dtype} {tuple(scales_zeros.shape)}"
        raise ValueError(f"{name} must be float32 {(*cache.shape[:3], 2)} with unit last stride, got {got}")


def fill_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    slot_mapping: torch.Tensor,
    k_scales_zeros: torch.Tensor | None = None,
    v_scales_zeros: torch.Tensor | None = None,
    quant_bits: int = 0,
) -> None:
    """key/value [T, kv_heads, dim] (any strides) -> k_cache/v_cache rows; negative slots are skipped.

    value may be None (MLA keeps one latent cache), then only the keys are written. quant_bits 8 / 4: the caches
    are uint8 [num_blocks, block_size, kv_heads, dim * quant_bits // 8] and k/v_scales_zeros receive each row's
    (scale, zero point).
    """
    num_tokens, num_heads, k_dim = key.shape
    if quant_bits not in (0, 4, 8):
        raise ValueError(f"quant_bits must be 0, 4 or 8, got {quant_bits}")
    if quant_bits and (k_cache.dtype != torch.uint8 or k_dim * quant_bits % 8):
        raise ValueError(f"an int{quant_bits} cache is uint8 and needs an even head dim, got {k_cache.dtype}, {k_dim}")
    packed = (lambda dim: dim * quant_bits // 8) if quant_bits else (lambda dim: dim)
    if k_cache.dim() != 4 or k_cache.shape[2:] != (num_heads, packed(k_dim)):
        raise ValueError(f"k_cache {tuple(k_cache.shape)} does not hold keys {tuple(key.shape)}")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} must be [{num_tokens}]")
    has_value = value is not None and v_cache is not None
    if has_value:
        if value.shape[:2] != (num_tokens, num_heads) or v_cache.shape[2:] != (num_heads, packed(value.shape[2])):
            raise ValueError(f"v_cache {tuple(v_cache.shape)} does not hold values {tuple(value.shape)}")
        if v_cache.shape[:2] != k_cache.shape[:2]:
            raise ValueError("k_cache and v_cache must have the same blocks")
        if quant_bits and (v_cache.dtype != torch.uint8 or value.shape[2] * quant_bits % 8):
            raise ValueError(f"an int{quant_bits} value cache is uint8 and needs an even head dim")
    else:
        value, v_cache, v_scales_zeros = key, k_cache, k_scales_zeros  # unused pointers with valid strides
    if quant_bits:
        _check_scales(k_scales_zeros, k_cache, "k_scales_zeros")
        _check_scales(v_scales_zeros, v_cache, "v_scales_zeros")
        if k_scales_zeros.stride() != v_scales_zeros.stride():
            raise ValueError("k_scales_zeros and v_scales_zeros must have the same strides")
    else:
        k_scales_zeros = v_scales_zeros = k_cache  # unused
    if num_tokens == 0:
        return
    v_dim = value.shape[2]
    _fill_kv_cache_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        k_scales_zeros,
        v_scales_zeros,
        slot_mapping,
        k_cache.shape[1],
        num_heads,
        k_dim,
        v_dim,
        *key.stride(),
        *value.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *k_scales_zeros.stride()[:3],
        HAS_VALUE=has_value,
        QUANT=quant_bits,
        FP8=k_cache.dtype == torch.float8_e4m3fn,
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_DK=max(2, triton.next_power_of_2(k_dim)),
        BLOCK_DV=max(2, triton.next_power_of_2(v_dim)),
        num_warps=4,
    )


stable_cache_keys(globals())
