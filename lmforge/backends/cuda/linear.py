"""Dense linear layers: a single row (batch-1 decode) goes to the Triton GEMV, which streams the weight at the
memory bound; everything else to cuBLAS through torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.kernels.cuda.gemv import gemv as gemv_kernel
from lmforge.kernels.cuda.gemv import supports_gemv

# benchmarks switch it off to time cuBLAS on the same shapes; read at call time, so before a graph is captured
GEMV_ENABLED = True


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear's contract: x [..., K], weight [N, K], bias [N] -> [..., N]. A shape test picks the kernel, so the
    choice is fixed when a decode step is captured in a CUDA graph."""
    if GEMV_ENABLED and supports_gemv(x, weight) and (bias is None or bias.dtype == x.dtype):
        return gemv_kernel(x, weight, bias)
    return F.linear(x, weight, bias)
