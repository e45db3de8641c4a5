"""Rotary embedding in the rotate-half (neox) layout, applied in place to q and k in one launch.

q and k are often column slices of one fused qkv output, so every stride is honoured and nothing is
copied. With partial rotary (rot_dim < head_dim) the channels past rot_dim are left as they are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import stable_cache_keys


@triton.jit
def _rotate_heads(
    x_ptr,
    token,
    head0,
    num_heads,
    stride_t,
    stride_h,
    stride_d,
    cos1,
    cos2,
    sin1,
    sin2,
    half,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    heads = head0 + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (cols[None, :] < half)
    ptr1 = x_ptr + token * stride_t + heads[:, None] * stride_h + cols[None, :] * stride_d
    ptr2 = ptr1 + half * stride_d
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr2, mask=mask, other=0.0).to(tl.float32)
    # out = x * cos + [-x2, x1] * sin, taking cos/sin of each half from its own columns
    tl.store(ptr1, (x1 * cos1[None, :] - x2 * sin1[None, :]).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(ptr2, (x2 * cos2[None, :] + x1 * sin2[None, :]).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    num_q_heads,
    num_k_heads,
    half,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_cos,
    stride_sin,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    cols = tl.arange(0, BLOCK_HALF)
    cmask = cols < half
    cos1 = tl.load(cos_ptr + token * stride_cos + cols, mask=cmask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + token * stride_cos + half + cols, mask=cmask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + token * stride_sin + cols, mask=cmask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + token * stride_sin + half + cols, mask=cmask, other=0.0).to(tl.float32)
    num_q_blocks = tl.cdiv(num_q_heads, BLOCK_H)
    if head_block < num_q_blocks:
        _rotate_heads(
            q_ptr,
            token,
            head_block * BLOCK_H,
            num_q_heads,
            stride_qt,
            stride_qh,
            stride_qd,
            cos1,
            cos2,
            sin1,
            sin2,
            half,
            BLOCK_H,
            BLOCK_HALF,
        )
    else:
        _rotate_heads(
            k_ptr,
            token,
            (head_block - num_q_blocks) * BLOCK_H,
            num_k_heads,
            stride_kt,
            stride_kh,
            stride_kd,
            cos1,
            cos2,
            sin1,
            sin2,
            half,
            BLOCK_H,
            BLOCK_HALF,
        )


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hk, D] (any strides), cos/sin [T, rot_dim] -> (q, k), rotated in place."""
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be [tokens, heads, head_dim], got {tuple(q.shape)} and {tuple(k.shape)}")
    num_tokens, num_q_heads, head_dim = q.shape
    rot = cos.shape[-1]
    if k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}")
    if cos.shape != (num_tokens, rot) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be [{num_tokens}, rot_dim], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if rot % 2 or rot > head_dim:
        raise ValueError(f"rot_dim {rot} must be even and at most head_dim {head_dim}")
    if num_tokens == 0:
        return q, k
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    half = rot // 2
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(max(q.shape[1], k.shape[1])), 2048 // block_half))
    grid = (num_tokens, triton.cdiv(num_q_heads, block_h) + triton.cdiv(k.shape[1], block_h))
    _rotary_kernel[grid](
        q,
        k,
        cos,
        sin,
        num_q_heads,
        k.shape[1],
        half,
        *q.stride(),
        *k.stride(),
        cos.stride(0),
        sin.stride(0),
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        num_warps=4,
    )
    return q, k


@triton.jit
def _cos_sin_kernel(
    pos_ptr,
    inv_freq_ptr,
    cos_ptr,
    sin_ptr,
    half,
    position_scale,
    attention_scaling,
    HAS_POSITION_SCALE: tl.constexpr,
    HAS_SCALING: tl.constexpr,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < half
    pos = tl.load(pos_ptr + token).to(tl.float32)
    freqs = pos * tl.load(inv_freq_ptr + cols, mask=mask, other=0.0)
    if HAS_POSITION_SCALE:
        freqs = freqs / position_scale
    cos = tl.cos(freqs)
    sin = tl.sin(freqs)
    if HAS_SCALING:
        cos = cos * attention_scaling
        sin = sin * attention_scaling
    row = token * 2 * half
    tl.store(cos_ptr + row + cols, cos, mask=mask)
    tl.store(cos_ptr + row + half + cols, cos, mask=mask)
    tl.store(sin_ptr + row + cols, sin, mask=mask)
    tl.store(sin_ptr + row + half + cols, sin, mask=mask)


def rotary_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, position_scale: float = 1.0, attention_scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [T] (any integer or float dtype), inv_freq [rot_dim // 2] float32 -> (cos, sin), each
    [T, rot_dim] float32: angle = position * inv_freq / position_scale, both halves alike, times attention_scaling.
    One launch for what torch does in eight."""
    if position_ids.dim() != 1 or inv_freq.dim() != 1:
        raise ValueError(
            f"position_ids must be [T] and inv_freq [rot_dim // 2], got {tuple(position_ids.shape)}, "
            f"{tuple(inv_freq.shape)}"
        )
    half = inv_freq.shape[0]
    num_tokens = position_ids.shape[0]
    cos = torch.empty(num_tokens, 2 * half, dtype=torch.float32, device=position_ids.device)
    sin = torch.empty_like(cos)
    if num_tokens == 0:
        return cos, sin
    _cos_sin_kernel[(num_tokens,)](
        position_ids if position_ids.stride(0) == 1 else position_ids.contiguous(),
        inv_freq.float().contiguous(),
        cos,
        sin,
        half,
        float(position_scale),
        float(attention_scaling),
        HAS_POSITION_SCALE=position_scale != 1.0,
        HAS_SCALING=attention_scaling != 1.0,
        BLOCK=triton.next_power_of_2(half),
        num_warps=1,
    )
    return cos, sin


stable_cache_keys(globals())
