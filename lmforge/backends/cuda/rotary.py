"""Rotary embedding on the Triton kernel: rotates q and k in place (they are usually views of the
qkv projection output, so nothing is copied) and returns them."""

import torch

from lmforge.kernels.cuda.rotary import apply_rotary as rotary_kernel
from lmforge.kernels.cuda.rotary import rotary_cos_sin as cos_sin_kernel


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hk, D], cos/sin [T, rot_dim] with rot_dim <= D (partial rotary)."""
    return rotary_kernel(q, k, cos, sin)


def rotary_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, position_scale: float = 1.0, attention_scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [T], inv_freq [rot_dim // 2] float32 -> (cos, sin) [T, rot_dim] float32, in one launch."""
    return cos_sin_kernel(position_ids, inv_freq, position_scale, attention_scaling)
