"""RMSNorm and LayerNorm with an optional fused residual add (computed in float32, as HF does)."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmforge.kernels import cpu as cpu_kernels


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    weight_offset: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Returns norm(x) or, given a residual, (norm(x + residual), x + residual).

    weight_offset=1 gives Gemma's `x * (1 + w)` form.
    """
    fused = cpu_kernels.rms_norm(x, weight, eps, residual, weight_offset)  # None where the kernels do not apply
    if fused is not None:
        return fused
    dtype = x.dtype
    if residual is not None:
        x = x + residual
        residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.float() + weight_offset if weight_offset else weight.float()
    if weight_offset:
        out = (h * w).to(dtype)
    else:
        out = weight * h.to(dtype)
    return out if residual is None else (out, residual)


def sharded_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    full_size: int,
    residual: torch.Tensor | None = None,
    weight_offset: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """rms_norm over features split across the TP ranks: x [..., full_size / tp] is this rank's slice, so the
    sum of squares is all-reduced over the default (TP) group before it is divided by full_size."""
    dtype = x.dtype
    if residual is not None:
        x = x + residual
        residual = x
    h = x.float()
    sum_sq = h.pow(2).sum(-1, keepdim=True)
    dist.all_reduce(sum_sq)
    h = h * torch.rsqrt(sum_sq / full_size + eps)
    out = (h * (weight.float() + weight_offset)).to(dtype)
    return out if residual is None else (out, residual)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim; weight/bias are [d] or broadcast over x's trailing dims ([heads, d])."""
    if residual is not None:
        x = x + residual
        residual = x
    h = F.layer_norm(x.float(), x.shape[-1:], None, None, eps) * weight.float()
    if bias is not None:
        h = h + bias.float()
    out = h.to(x.dtype)
    return out if residual is None else (out, residual)
