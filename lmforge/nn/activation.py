"""Gated activations: [..., 2 * d] -> [..., d]."""

import torch
from torch import nn

from lmforge.backends.registry import get_op


class SiluAndMul(nn.Module):
    """silu(gate) * up for x = [gate | up]."""

    def __init__(self, inplace: bool = True):
        super().__init__()
        self.inplace = inplace
        self.op = get_op("silu_and_mul")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, inplace=self.inplace)


class GeluAndMul(nn.Module):
    """gelu(gate) * up; approximate='tanh' is the gelu_pytorch_tanh of Gemma."""

    def __init__(self, approximate: str = "none", inplace: bool = False):
        super().__init__()
        self.approximate = approximate
        self.op = get_op("gelu_and_mul")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, approximate=self.approximate)
