"""RMSNorm on the Triton kernel; rows too wide for one program use the cpu reference (plain torch)."""

import torch

from lmforge.backends.cpu import norm as cpu_norm
from lmforge.kernels.cuda.rms_norm import MAX_HIDDEN_SIZE
from lmforge.kernels.cuda.rms_norm import rms_norm as rms_norm_kernel


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    weight_offset: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Returns norm(x) or, given a residual, (norm(x + residual), x + residual)."""
    if x.shape[-1] > MAX_HIDDEN_SIZE:
        return cpu_norm.rms_norm(x, weight, eps, residual, weight_offset)
    return rms_norm_kernel(x, weight, eps, residual, weight_offset)
