"""Normalisation layers. RMSNorm fuses the residual add: norm(x, residual) -> (out, x + residual)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.backends.registry import current_build_context, get_op
from lmforge.nn.linear import default_weight_loader


class RMSNorm(nn.Module):
    """weight_offset=1.0 gives Gemma's `(1 + w)` scaling with checkpoints stored as w."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, weight_offset: float = 0.0, dtype=None, device=None):
        super().__init__()
        ctx = current_build_context()
        self.weight = nn.Parameter(
            torch.ones(hidden_size, dtype=dtype or ctx.dtype, device=device or ctx.device), False
        )
        self.weight.weight_loader = default_weight_loader
        self.eps, self.weight_offset = eps, weight_offset
        self.op = get_op("rms_norm")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self.op(x, self.weight, self.eps, residual, self.weight_offset)


class LayerNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True, dtype=None, device=None):
        super().__init__()
        ctx = current_build_context()
        dtype, device = dtype or ctx.dtype, device or ctx.device
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), False)
        self.weight.weight_loader = default_weight_loader
        if bias:
            self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device), False)
            self.bias.weight_loader = default_weight_loader
        else:
            self.register_parameter("bias", None)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            x = x + residual
            residual = x
        out = F.layer_norm(
            x.float(), x.shape[-1:], self.weight.float(), None if self.bias is None else self.bias.float(), self.eps
        ).to(x.dtype)
        return out if residual is None else (out, residual)
