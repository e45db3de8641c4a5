"""Activations, computed in float32: gated, x = [gate | up] of [..., 2 * d] -> act(gate) * up of [..., d], and
plain, x of [..., d] -> act(x) of [..., d]."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import stable_cache_keys, tanh

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
PLAIN_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2")


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == "silu":
        out = x / (1.0 + tl.exp(-x))
    elif ACT == "gelu":
        out = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == "gelu_tanh":  # sqrt(2 / pi) = 0.7978845608028654
        out = 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACT == "relu":
        out = tl.maximum(x, 0.0)
    else:  # relu2
        out = tl.maximum(x, 0.0)
        out = out * out
    return out


@triton.jit
def _gated_activation_kernel(x_ptr, out_ptr, d, stride_x, stride_out, ACT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    act = _act(gate, ACT)
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _activation_kernel(x_ptr, out_ptr, d, stride_x, ACT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * d + cols, _act(x, ACT).to(out_ptr.dtype.element_ty), mask=mask)


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


def activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    """x [..., d] -> act(x) [..., d] (a new contiguous tensor); activation is one of PLAIN_ACTIVATIONS."""
    if activation not in PLAIN_ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {PLAIN_ACTIVATIONS}")
    d = x.shape[-1]
    out = x.new_empty(x.shape)
    if out.numel() == 0:
        return out
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    block = min(1024, triton.next_power_of_2(d))
    grid = (x2.shape[0], triton.cdiv(d, block))
    _activation_kernel[grid](x2, out, d, x2.stride(0), ACT=activation, BLOCK=block, num_warps=4)
    return out


stable_cache_keys(globals())
