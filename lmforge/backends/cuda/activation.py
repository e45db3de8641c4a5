"""Activations on the Triton kernels; same signatures as lmforge.backends.cpu.activation."""

import torch

from lmforge.kernels.cuda.activation import activation as activation_kernel
from lmforge.kernels.cuda.activation import gated_activation


def silu_and_mul(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """inplace is accepted for the cpu signature but a new contiguous tensor is returned either way:
    the next matmul reads it faster than a strided view into x, and the allocation is from the cache."""
    return gated_activation(x, "silu")


def gelu_and_mul(x: torch.Tensor, approximate: str = "none", inplace: bool = False) -> torch.Tensor:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return gated_activation(x, "gelu_tanh" if approximate == "tanh" else "gelu")


def activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    return activation_kernel(x, kind)
