"""y = x W^T (+ b) for a single row x: a GEMV that streams the weight once, at the memory bound.

A batch-1 decode step is this shape in every projection. Each program owns BLOCK_N output features and walks
the whole K dimension, keeping a [BLOCK_N, BLOCK_K] float32 partial product in registers and reducing it once at the
end, so there is no split-K workspace, no second kernel and no atomics. The weight is read row-major ([N, K], K
contiguous), as nn.Linear stores it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import stable_cache_keys

GEMV_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    N,
    K,
    stride_wn,
    HAS_BIAS: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    row_mask = rows < N
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptr + k0 + cols)
            if EVEN_N:
                w = tl.load(w_ptrs + k0)
            else:
                w = tl.load(w_ptrs + k0, mask=row_mask[:, None], other=0.0)
        else:
            k_mask = k0 + cols < K
            x = tl.load(x_ptr + k0 + cols, mask=k_mask, other=0.0)
            w = tl.load(w_ptrs + k0, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)


def gemv_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for an [n, k] weight, from an H200 sweep of the llama-1b / 8b
    projections (benchmarks/decode_profile.py --gemv): two rows x 1024 columns per step is at or within 1% of the
    best everywhere (o, gate_up, down, lm_head: 2.1-4.4 TB/s) except qkv-like shapes (n / k in [1.25, 2]), where
    4-8 rows x 512 columns wins by 4-6%."""
    if k < 1024 or k % 1024 or 1.25 <= n / k <= 2:
        block_k = 512 if k >= 512 else max(16, triton.next_power_of_2(k))
        return (4 if n <= 4096 else 8), block_k, 4, 3
    return 2, 1024, 4, 3


def supports_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether gemv() takes this call: one row, a dense fp16/bf16 weight of x's dtype, K-contiguous."""
    return (
        x.dtype in GEMV_DTYPES
        and weight.dtype == x.dtype
        and weight.dim() == 2
        and weight.stride(1) == 1
        and x.shape[-1] == weight.shape[1]
        and x.numel() == weight.shape[1]
        and x.is_cuda
    )


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: tuple | None = None
) -> torch.Tensor:
    """x [..., K] holding one row, weight [N, K], bias [N] -> [..., N] in x's dtype (float32 accumulation)."""
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or x.numel() != weight.shape[1]:
        raise ValueError(f"gemv: x {tuple(x.shape)} must be one row of weight's K ({tuple(weight.shape)})")
    if weight.stride(1) != 1:
        raise ValueError("gemv: the weight's rows must be contiguous")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"gemv: bias {tuple(bias.shape)} must be [{weight.shape[0]}]")
    n, k = weight.shape
    x1 = x.reshape(k)
    if x1.stride(0) != 1:
        x1 = x1.contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages = config or gemv_config(n, k)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x1,
        weight,
        bias if bias is not None else weight,
        y,
        n,
        k,
        weight.stride(0),
        HAS_BIAS=bias is not None,
        EVEN_N=n % block_n == 0,
        EVEN_K=k % block_k == 0,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
        num_stages=stages,
    )
    return y


stable_cache_keys(globals())
