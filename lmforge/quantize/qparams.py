"""Integer and FP8 quantization of weight matrices: per-group scale / zero-point search and rounding.

Conventions (shared by RTN, GPTQ and AWQ): a weight is `W [N, K]` (out, in features), groups run along K,
`scales` and `zeros` are `[N, num_groups]` here (the writers transpose to the formats' `[K // G, N]`), `zeros`
in integer units, and `W ~ (q - zeros) * scales` with `q` in `[0, 2**bits - 1]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


@dataclass(slots=True)
class QuantSpec:
    """bits 4 or 8; group_size -1 = one group per output channel; sym: zero point fixed at 2**(bits-1).
    min_zero 1 for GPTQ's v1 format, which stores zero - 1 in `bits` bits and so cannot hold a zero of 0."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    min_zero: int = 0

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8 for integer weight quantization, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group size must be positive or -1 (per channel), got {self.group_size}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group_len(self, in_features: int) -> int:
        g = in_features if self.group_size == -1 else self.group_size
        if in_features % g:
            raise ValueError(
                f"group size {g} does not divide the layer's {in_features} input features; choose a group size "
                "that divides every linear layer's input size (e.g. 32, 64, 128) or -1"
            )
        return g


def group_params(w: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype = torch.float16):
    """Scale and zero point `[N, 1]` for the group `w [N, G]` (min/max over the row). The scale is rounded to
    `scale_dtype` first, since the checkpoint stores it there and the integers must fit the stored scale."""
    w = w.float()
    if spec.sym:
        amax = w.abs().amax(dim=1, keepdim=True)
        scale = (2 * amax / spec.maxq).clamp(min=1e-8)  # GPTQ's symmetric grid: zero at 2**(bits-1)
        scale = scale.to(scale_dtype).float().clamp(min=torch.finfo(scale_dtype).tiny)
        zero = torch.full_like(scale, 2 ** (spec.bits - 1))
    else:
        wmin = w.amin(dim=1, keepdim=True).clamp(max=0)
        wmax = w.amax(dim=1, keepdim=True).clamp(min=0)
        scale = ((wmax - wmin) / spec.maxq).clamp(min=1e-8)
        scale = scale.to(scale_dtype).float().clamp(min=torch.finfo(scale_dtype).tiny)
        zero = torch.round(-wmin / scale).clamp(spec.min_zero, spec.maxq)
    return scale, zero


def quantize_int(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (int32) of `w` on the grid (scale, zero), broadcast along the last dim."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, maxq).to(torch.int32)


def dequantize_int(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q.float() - zero) * scale


@dataclass(slots=True)
class IntWeight:
    """A quantized linear: q int32 [N, K], scales / zeros float32 [N, num_groups], g_idx int32 [K] (group of each
    input column; not always k // G after GPTQ's act-order)."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    spec: QuantSpec

    def dequantize(self) -> torch.Tensor:
        idx = self.g_idx.long()
        return (self.q.float() - self.zeros[:, idx]) * self.scales[:, idx]


def rtn_quantize(w: torch.Tensor, spec: QuantSpec) -> IntWeight:
    """Round to nearest, group by group (also the final step of AWQ, after its scaling and clipping)."""
    n, k = w.shape
    g = spec.group_len(k)
    groups = w.float().reshape(n * (k // g), g)
    scale, zero = group_params(groups, spec)
    q = quantize_int(groups, scale, zero, spec.maxq).reshape(n, k)
    g_idx = torch.arange(k, dtype=torch.int32) // g
    return IntWeight(q, scale.reshape(n, k // g), zero.reshape(n, k // g), g_idx, spec)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """RTN quantize then dequantize, in w's dtype (AWQ's search objective)."""
    return rtn_quantize(w, spec).dequantize().to(w.dtype)


def _channel_scale(w: torch.Tensor, qmax: float, scale_dtype: torch.dtype) -> torch.Tensor:
    """amax / qmax per row, stored in scale_dtype and rounded up there, so the largest weight is not clipped."""
    amax = w.float().abs().amax(dim=1, keepdim=True)
    scale = (amax / qmax).clamp(min=1e-12).to(scale_dtype)
    short = scale.float() * qmax < amax
    return torch.where(short, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)


def fp8_quantize(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel: (weight float8_e4m3fn [N, K], weight_scale [N, 1] in scale_dtype), scale = amax / 448."""
    scale = _channel_scale(w, FP8_MAX, scale_dtype)
    q = (w.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def int8_quantize(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel, symmetric: (weight int8 [N, K], weight_scale [N, 1]), scale = amax / 127."""
    scale = _channel_scale(w, 127, scale_dtype)
    q = torch.round(w.float() / scale.float()).clamp(-128, 127).to(torch.int8)
    return q, scale
