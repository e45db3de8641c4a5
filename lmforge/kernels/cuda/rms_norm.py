"""RMSNorm with a fused residual add: one program per row, the whole row in registers.

Rounding follows the cpu reference step by step (x + residual rounded to the input dtype before it
is normalised; without an offset the normalised row is rounded before the weight multiplies it, as
HF Llama does), so the two backends differ only by float32 summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import stable_cache_keys

MAX_HIDDEN_SIZE = 32768  # one row must fit in registers


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    new_res_ptr,
    n,
    stride_x,
    stride_res,
    eps,
    weight_offset,
    HAS_RESIDUAL: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(new_res_ptr + row * n + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_OFFSET:
        out = h * rstd * (w + weight_offset)
    else:
        out = (h * rstd).to(x_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * n + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, weight_offset: float = 0.0
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] -> norm(x), or (norm(x + residual), x + residual) given a residual; new tensors, inputs untouched."""
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {n}")
    if n > MAX_HIDDEN_SIZE:
        raise ValueError(f"hidden size {n} exceeds the kernel's limit {MAX_HIDDEN_SIZE}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    # the cpu op returns weight * h.to(x.dtype) without an offset, so torch's type promotion decides its dtype
    out_dtype = x.dtype if weight_offset else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    new_res = torch.empty_like(x) if residual is not None else None
    if x.numel() == 0:
        return out if residual is None else (out, new_res)
    x2 = _rows(x, n)
    weight = weight.contiguous()
    res2 = _rows(residual, n) if residual is not None else x2
    block = triton.next_power_of_2(n)
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    _rms_norm_kernel[(x2.shape[0],)](
        x2,
        res2,
        weight,
        out,
        new_res if new_res is not None else out,
        n,
        x2.stride(0),
        res2.stride(0),
        eps,
        float(weight_offset),
        HAS_RESIDUAL=residual is not None,
        HAS_OFFSET=bool(weight_offset),
        BLOCK=block,
        num_warps=num_warps,
    )
    return out if residual is None else (out, new_res)


stable_cache_keys(globals())
