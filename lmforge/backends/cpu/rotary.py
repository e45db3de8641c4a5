"""Rotary embedding applied in the HF 'rotate half' (neox) layout."""

import torch

from lmforge.kernels import cpu as cpu_kernels


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [num_tokens, heads, rot_dim]; cos/sin [num_tokens, 1, rot_dim]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hk, D], cos/sin [T, rot_dim] with rot_dim <= D (partial rotary)."""
    fused = cpu_kernels.apply_rotary(q, k, cos, sin)  # None where the kernels are off or do not take q, k
    if fused is not None:
        return fused
    rot = cos.shape[-1]
    cos = cos[:, None, :].to(q.dtype)
    sin = sin[:, None, :].to(q.dtype)
    if rot == q.shape[-1]:
        return _rotate(q, cos, sin), _rotate(k, cos, sin)
    q = torch.cat((_rotate(q[..., :rot], cos, sin), q[..., rot:]), dim=-1)
    k = torch.cat((_rotate(k[..., :rot], cos, sin), k[..., rot:]), dim=-1)
    return q, k


def rotary_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, position_scale: float = 1.0, attention_scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [T], inv_freq [rot_dim // 2] float32 -> (cos, sin), each [T, rot_dim] float32: the angle
    position * inv_freq / position_scale on both halves, times attention_scaling."""
    kernel = cpu_kernels.rotary_cos_sin(position_ids, inv_freq, position_scale, attention_scaling)
    if kernel is not None:
        return kernel
    freqs = position_ids.float()[:, None] * inv_freq[None, :]
    if position_scale != 1.0:
        freqs = freqs / position_scale
    emb = torch.cat((freqs, freqs), dim=-1)
    if attention_scaling == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling
