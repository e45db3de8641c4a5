"""Rotary embedding on the Triton kernel: rotates q and k in place (they are usually views of the
qkv projection output, so nothing is copied) and returns them."""

import torch

from lmforge.kernels.cuda.rotary import apply_rotary as rotary_kernel


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hk, D], cos/sin [T, rot_dim] with rot_dim <= D (partial rotary)."""
    return rotary_kernel(q, k, cos, sin)
