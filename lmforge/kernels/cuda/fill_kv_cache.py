"""Scatter this step's keys and values [num_tokens, kv_heads, dim] into the paged cache
[num_blocks, block_size, kv_heads, dim] at the slots of slot_mapping (block_id * block_size + offset)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_token(
    src_ptr,
    dst_ptr,
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
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_heads) & (cols[None, :] < dim)
    src = src_ptr + token * stride_st + heads[:, None] * stride_sh + cols[None, :] * stride_sd
    dst = dst_ptr + block_id * stride_db + offset * stride_ds + heads[:, None] * stride_dh + cols[None, :] * stride_dd
    tl.store(dst, tl.load(src, mask=mask).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fill_kv_cache_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
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
    HAS_VALUE: tl.constexpr,
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
        BLOCK_H,
        BLOCK_DK,
    )
    if HAS_VALUE:
        _copy_token(
            value_ptr,
            v_cache_ptr,
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
            BLOCK_H,
            BLOCK_DV,
        )


def fill_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    slot_mapping: torch.Tensor,
) -> None:
    """key/value [T, kv_heads, dim] (any strides) -> k_cache/v_cache rows; negative slots are skipped.

    value may be None (MLA keeps one latent cache), then only the keys are written.
    """
    num_tokens, num_heads, k_dim = key.shape
    if k_cache.dim() != 4 or k_cache.shape[2:] != (num_heads, k_dim):
        raise ValueError(f"k_cache {tuple(k_cache.shape)} does not hold keys {tuple(key.shape)}")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} must be [{num_tokens}]")
    has_value = value is not None and v_cache is not None
    if has_value:
        if value.shape[:2] != (num_tokens, num_heads) or v_cache.shape[2:] != value.shape[1:]:
            raise ValueError(f"v_cache {tuple(v_cache.shape)} does not hold values {tuple(value.shape)}")
        if v_cache.shape[:2] != k_cache.shape[:2]:
            raise ValueError("k_cache and v_cache must have the same blocks")
    else:
        value, v_cache = key, k_cache  # unused pointers with valid strides
    if num_tokens == 0:
        return
    v_dim = value.shape[2]
    _fill_kv_cache_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        k_cache.shape[1],
        num_heads,
        k_dim,
        v_dim,
        *key.stride(),
        *value.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        HAS_VALUE=has_value,
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_DK=triton.next_power_of_2(k_dim),
        BLOCK_DV=triton.next_power_of_2(v_dim),
        num_warps=4,
    )
