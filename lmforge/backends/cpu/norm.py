"""RMSNorm with an optional fused residual add (computed in float32, as HF does)."""

import torch


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
