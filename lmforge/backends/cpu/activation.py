"""Activations. Gated: input [..., 2 * d] = [gate | up] -> act(gate) * up, [..., d]. Plain: [..., d] -> [..., d]."""

import torch
import torch.nn.functional as F

from lmforge.kernels import cpu as cpu_kernels

# the plain activations `activation` computes; HF's hidden_act names map onto these in lmforge.nn.activation
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2")


def silu_and_mul(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    fused = cpu_kernels.silu_and_mul(x)  # None where the kernels are off or do not take x
    if fused is not None:
        return fused
    gate, up = x.chunk(2, dim=-1)
    if inplace:
        return F.silu(gate, inplace=True).mul_(up)
    return F.silu(gate) * up


def gelu_and_mul(x: torch.Tensor, approximate: str = "none", inplace: bool = False) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate=approximate) * up


def activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    """act(x), computed in float32 and returned in x's dtype. relu2 is ReLU squared (Primer, Nemotron)."""
    h = x.float()
    if kind == "silu":
        out = F.silu(h)
    elif kind == "gelu":
        out = F.gelu(h)
    elif kind == "gelu_tanh":
        out = F.gelu(h, approximate="tanh")
    elif kind == "relu":
        out = F.relu(h)
    elif kind == "relu2":
        out = F.relu(h).square()
    else:
        raise ValueError(f"unknown activation {kind!r}; known: {ACTIVATIONS}")
    return out.to(x.dtype)
