"""Rotary embedding applied in the HF 'rotate half' (neox) layout."""

import torch


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
    rot = cos.shape[-1]
    cos = cos[:, None, :].to(q.dtype)
    sin = sin[:, None, :].to(q.dtype)
    if rot == q.shape[-1]:
        return _rotate(q, cos, sin), _rotate(k, cos, sin)
    q = torch.cat((_rotate(q[..., :rot], cos, sin), q[..., rot:]), dim=-1)
    k = torch.cat((_rotate(k[..., :rot], cos, sin), k[..., rot:]), dim=-1)
    return q, k
