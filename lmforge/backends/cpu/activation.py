"""Gated activations: input [..., 2 * d] = [gate | up] -> act(gate) * up, [..., d]."""

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    if inplace:
        return F.silu(gate, inplace=True).mul_(up)
    return F.silu(gate) * up


def gelu_and_mul(x: torch.Tensor, approximate: str = "none", inplace: bool = False) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate=approximate) * up
