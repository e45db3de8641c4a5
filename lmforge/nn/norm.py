"""Normalisation layers. Each fuses the residual add: norm(x, residual) -> (norm(x + residual), x + residual).

`NormSpec` names a family's norm (RMSNorm or LayerNorm, its eps field, bias, Gemma's (1 + w)) and `build_norm`
builds it; the model scaffold builds every norm of a stack from one spec. Norms over a tensor that is sharded
across TP ranks take `shard=(num_shards, index)`: per-head weights (`(num_heads, head_dim)`) keep the rank's
heads, and a norm over the full projected width (OLMo 2's q/k norm) all-reduces its sum of squares."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.backends.registry import current_build_context, get_op
from lmforge.nn.linear import default_weight_loader


@dataclass(frozen=True, slots=True)
class NormSpec:
    """kind 'rms' or 'layer'; eps_field is the HF config attribute holding eps; bias applies to LayerNorm only."""

    kind: str = "rms"
    eps_field: str = "rms_norm_eps"
    bias: bool = True
    weight_offset: float = 0.0

    def eps(self, config) -> float:
        eps = getattr(config, self.eps_field, None)
        if eps is None:
            raise ValueError(f"config of model_type {getattr(config, 'model_type', None)!r} has no {self.eps_field}")
        return eps


LLAMA_NORM = NormSpec()
LAYER_NORM = NormSpec("layer", "layer_norm_eps")


def _shape(size: int | tuple[int, ...], shard: tuple[int, int] | None) -> tuple[int, ...]:
    shape = (size,) if isinstance(size, int) else tuple(size)
    if shard is not None and shard[0] > 1:
        if shape[0] % shard[0]:
            raise ValueError(f"a norm of shape {shape} cannot be split over {shard[0]} TP ranks")
        shape = (shape[0] // shard[0], *shape[1:])
    return shape


def _param(shape: tuple[int, ...], fill: float, shard: tuple[int, int] | None, dtype, device) -> nn.Parameter:
    ctx = current_build_context()
    param = nn.Parameter(torch.full(shape, fill, dtype=dtype or ctx.dtype, device=device or ctx.device), False)
    if shard is None or shard[0] == 1:
        param.weight_loader = default_weight_loader
    else:  # this rank's rows (heads, or a slice of the full width)
        num, index = shard
        param.weight_loader = lambda p, w, shard_id=None: default_weight_loader(p, w.chunk(num, 0)[index])
    return param


class RMSNorm(nn.Module):
    """weight_offset=1.0 gives Gemma's `(1 + w)` scaling with checkpoints stored as w. With `shard` and
    full_width=True the norm spans all ranks: each holds a slice of the features and of the weight."""

    def __init__(
        self,
        hidden_size: int | tuple[int, ...],
        eps: float = 1e-6,
        weight_offset: float = 0.0,
        dtype=None,
        device=None,
        shard: tuple[int, int] | None = None,
        full_width: bool = False,
    ):
        super().__init__()
        self.weight = _param(_shape(hidden_size, shard), 1.0, shard, dtype, device)
        self.eps, self.weight_offset = eps, weight_offset
        self.full_size = hidden_size if isinstance(hidden_size, int) else None
        self.is_sharded = full_width and shard is not None and shard[0] > 1
        self.op = get_op("sharded_rms_norm" if self.is_sharded else "rms_norm")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.is_sharded:
            return self.op(x, self.weight, self.eps, self.full_size, residual, self.weight_offset)
        return self.op(x, self.weight, self.eps, residual, self.weight_offset)


class LayerNorm(nn.Module):
    """Over the last dim; hidden_size (num_heads, head_dim) gives a weight per head (Cohere's and StableLM's q/k
    norms), whose rows `shard` splits by head."""

    def __init__(
        self,
        hidden_size: int | tuple[int, ...],
        eps: float = 1e-5,
        bias: bool = True,
        dtype=None,
        device=None,
        shard: tuple[int, int] | None = None,
    ):
        super().__init__()
        shape = _shape(hidden_size, shard)
        self.weight = _param(shape, 1.0, shard, dtype, device)
        if bias:
            self.bias = _param(shape, 0.0, shard, dtype, device)
        else:
            self.register_parameter("bias", None)
        self.eps = eps
        self.op = get_op("layer_norm")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self.op(x, self.weight, self.bias, self.eps, residual)


def build_norm(
    spec: NormSpec,
    config,
    size: int | tuple[int, ...],
    shard: tuple[int, int] | None = None,
    full_width: bool = False,
) -> RMSNorm | LayerNorm:
    """The norm `spec` describes over `size` features, with eps read from `config`; `shard` and full_width as
    RMSNorm / LayerNorm take them."""
    if spec.kind == "rms":
        return RMSNorm(size, spec.eps(config), spec.weight_offset, shard=shard, full_width=full_width)
    if full_width and shard is not None and shard[0] > 1:
        raise ValueError("a LayerNorm over features split across TP ranks is not supported (only RMSNorm)")
    if spec.kind == "layer":
        if spec.weight_offset:
            raise ValueError("weight_offset is an RMSNorm option")
        return LayerNorm(size, spec.eps(config), bias=spec.bias, shard=shard)
    raise ValueError(f"unknown norm kind {spec.kind!r}; known: 'rms', 'layer'")
