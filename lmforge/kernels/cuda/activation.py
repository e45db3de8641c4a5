"""Gated activations: x = [gate | up] of [..., 2 * d] -> act(gate) * up of [..., d], computed in float32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import tanh

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


@triton.jit
def _gated_activation_kernel(x_ptr, out_ptr, d, stride_x, stride_out, ACT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    if ACT == "silu":
        act = gate / (1.0 + tl.exp(-gate))
    elif ACT == "gelu":
        act = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    else:  # tanh approximation, sqrt(2 / pi) = 0.7978845608028654
        act = 0.5 * gate * (1.0 + tanh(0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)))
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def gated_activation(x: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """x [..., 2 * d] -> [..., d] (a new contiguous tensor). activation: 'silu', 'gelu' or 'gelu_tanh'."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {ACTIVATIONS}")
    if x.shape[-1] % 2:
        raise ValueError(f"last dim {x.shape[-1]} of a gated activation input must be even")
    d = x.shape[-1] // 2
    out = x.new_empty(*x.shape[:-1], d)
    if out.numel() == 0:
        return out
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    block = min(1024, triton.next_power_of_2(d))
    grid = (rows, triton.cdiv(d, block))
    _gated_activation_kernel[grid](x2, out, d, x2.stride(0), d, ACT=activation, BLOCK=block, num_warps=4)
    return out
