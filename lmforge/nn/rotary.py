"""Rotary position embedding: the builder picks the frequency schedule from the HF rope
parameters (default, linear, dynamic NTK, llama3, yarn, longrope); ApplyRotaryEmb rotates q and k."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.backends.registry import current_build_context, get_op


def rope_parameters(hf_config) -> dict:
    """The rope settings of an HF config as one dict (transformers 4.x `rope_scaling` + `rope_theta`,
    or 5.x `rope_parameters`)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    for key, value in scaling.items():
        params.setdefault(key, value)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return params


def _default_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
    old_ctx = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(dim: int, base: float, p: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    factor = p["factor"]
    old_ctx = p.get("original_max_position_embeddings") or max_pos
    beta_fast, beta_slow = p.get("beta_fast", 32), p.get("beta_slow", 1)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if p.get("attention_factor") is not None:
        attention_factor = p["attention_factor"]
    elif p.get("mscale") and p.get("mscale_all_dim"):
        attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
    else:
        attention_factor = mscale(factor)

    def correction_dim(num_rot: float) -> float:
        return (dim * math.log(old_ctx / (num_rot * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """position_ids [T] -> (cos, sin), each [T, rot_dim] float32."""

    def __init__(
        self, dim: int, inv_freq: torch.Tensor, attention_scaling: float = 1.0, position_scale: float = 1.0, device=None
    ):
        super().__init__()
        self.dim = dim
        self.register_buffer("inv_freq", inv_freq.float().to(device), persistent=False)
        self.attention_scaling, self.position_scale = attention_scaling, position_scale
        self.cos_sin = get_op("rotary_cos_sin")  # one kernel on cuda

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos_sin(position_ids, self.inv_freq, self.position_scale, self.attention_scaling)


class DynamicNTKRotaryEmbedding(RotaryEmbedding):
    """NTK-aware scaling that grows the base once positions pass the trained context
    (per step, from the largest position in the batch, as HF does per forward)."""

    def __init__(self, dim: int, base: float, factor: float, max_position_embeddings: int, device=None):
        super().__init__(dim, _default_inv_freq(dim, base), device=device)
        self.base, self.factor, self.max_pos = base, factor, max_position_embeddings

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = int(position_ids.max()) + 1 if position_ids.numel() else 0
        if seq_len <= self.max_pos:
            return super().forward(position_ids)
        base = self.base * ((self.factor * seq_len / self.max_pos) - (self.factor - 1)) ** (self.dim / (self.dim - 2))
        inv_freq = _default_inv_freq(self.dim, base).float().to(position_ids.device)
        freqs = position_ids.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


class LongRoPERotaryEmbedding(RotaryEmbedding):
    """Phi-3 longrope: short or long per-frequency factors, chosen by the step's largest position."""

    def __init__(self, dim: int, base: float, p: dict, max_pos: int, device=None):
        old_ctx = p.get("original_max_position_embeddings") or max_pos
        scale = max_pos / old_ctx
        attention_factor = p.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(old_ctx))
        base_inv = _default_inv_freq(dim, base)
        super().__init__(
            dim, base_inv / torch.tensor(p["short_factor"], dtype=torch.float64), attention_factor, device=device
        )
        self.register_buffer(
            "long_inv_freq",
            (base_inv / torch.tensor(p["long_factor"], dtype=torch.float64)).float().to(device),
            persistent=False,
        )
        self.old_ctx = old_ctx

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = int(position_ids.max()) + 1 if position_ids.numel() else 0
        inv_freq = self.long_inv_freq if seq_len > self.old_ctx else self.inv_freq
        freqs = position_ids.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def build_rotary_embedding(
    dim: int,
    max_position_embeddings: int = 2048,
    base: float = 10000.0,
    scaling_factor: float = 1.0,
    rope_type: str = "default",
    params: dict | None = None,
    device=None,
) -> RotaryEmbedding:
    p = dict(params or {})
    device = device or current_build_context().device
    if rope_type == "default":
        return RotaryEmbedding(dim, _default_inv_freq(dim, base), device=device)
    if rope_type == "linear":
        return RotaryEmbedding(dim, _default_inv_freq(dim, base), position_scale=scaling_factor, device=device)
    if rope_type == "dynamic":
        return DynamicNTKRotaryEmbedding(dim, base, scaling_factor, max_position_embeddings, device=device)
    if rope_type == "llama3":
        return RotaryEmbedding(dim, _llama3_inv_freq(_default_inv_freq(dim, base), p), device=device)
    if rope_type == "yarn":
        inv_freq, attention_factor = _yarn_inv_freq(dim, base, p, max_position_embeddings)
        return RotaryEmbedding(dim, inv_freq, attention_factor, device=device)
    if rope_type == "longrope":
        return LongRoPERotaryEmbedding(dim, base, p, max_position_embeddings, device=device)
    raise NotImplementedError(
        f"rope_type {rope_type!r} is not supported; supported: default, linear, dynamic, llama3, yarn, longrope"
    )


def build_rotary_embedding_from_config(
    hf_config, head_dim: int | None = None, base: float | None = None, params: dict | None = None
) -> RotaryEmbedding:
    """The rotary module an HF config asks for; base/params override the config (Gemma3 local layers)."""
    p = params if params is not None else rope_parameters(hf_config)
    head_dim = (
        head_dim or getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    )
    dim = int(head_dim * p.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0)))
    max_pos = getattr(hf_config, "max_position_embeddings", 2048)
    return build_rotary_embedding(
        dim, max_pos, base if base is not None else p["rope_theta"], p.get("factor", 1.0), p["rope_type"], p
    )


class ApplyRotaryEmb(nn.Module):
    """(q [T, Hq, D], k [T, Hk, D], cos, sin) -> rotated (q, k)."""

    def __init__(self):
        super().__init__()
        self.op = get_op("apply_rotary")

    def forward(self, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return self.op(query, key, cos, sin)
