"""Fixtures for quantized-checkpoint tests: a tiny random Llama (fp32) and activation fake-quantization hooks
that make an HF model compute what a W8A8 scheme computes (the contract's formulas, QUANT_CONTRACT.md)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from safetensors import safe_open

from lmforge.check_env.parity import build_tiny_model, tiny_hf_config

PROMPTS = [[5, 6, 7, 8, 9], [11, 3, 200, 17, 42, 9, 9, 100, 64, 12, 13, 14, 15, 16], [77] * 7]


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    return build_tiny_model(tiny_hf_config(family, **overrides), seed)


def _fake_quant(x: torch.Tensor, kind: str, scale=None, zero_point=None, group: int | None = None) -> torch.Tensor:
    xf = x.float()
    if kind == "fp8":
        if scale is None and group is None:
            scale = (xf.abs().amax(-1, keepdim=True) / 448.0).clamp(min=1e-12)
        elif scale is None:
            g = xf.unflatten(-1, (-1, group))
            scale = (g.abs().amax(-1, keepdim=True) / 448.0).clamp(min=1e-12)
            return ((g / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale).flatten(-2).to(x.dtype)
        return ((xf / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)
    if scale is None:
        g = xf.unflatten(-1, (-1, group or xf.shape[-1]))
        scale = (g.abs().amax(-1, keepdim=True) / 127.0).clamp(min=1e-12)
        return (torch.clamp(torch.round(g / scale), -128, 127) * scale).flatten(-2).to(x.dtype)
    zp = 0.0 if zero_point is None else zero_point.float()
    return ((torch.clamp(torch.round(xf / scale) + zp, -128, 127) - zp) * scale).to(x.dtype)


def add_activation_quant(hf_model, path: str, kind: str, group: int | None = None, tp: int = 1) -> None:
    """Pre-hooks on every quantized nn.Linear of hf_model: fake-quantize its input as the scheme does (static
    scales read from the checkpoint's input_scale / input_zero_point, dynamic ones per token or group). Under
    tensor parallelism a row-parallel layer (o_proj, down_proj) sees only its rank's slice of the in-features, so
    its dynamic per-token scales are per token and slice: tp gives the number of slices."""
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        names = set(f.keys())
        for name, mod in hf_model.named_modules():
            if not isinstance(mod, torch.nn.Linear) or not any(n.startswith(name + ".weight_scale") for n in names):
                continue
            scale = f.get_tensor(f"{name}.input_scale").float() if f"{name}.input_scale" in names else None
            zp = f.get_tensor(f"{name}.input_zero_point") if f"{name}.input_zero_point" in names else None

            row_parallel = name.endswith("o_proj") or name.endswith("down_proj")
            g = mod.in_features // tp if row_parallel and tp > 1 and group is None else group

            def hook(mod, args, scale=scale, zp=zp, g=g):
                return (_fake_quant(args[0], kind, scale, zp, g),)

            mod.register_forward_pre_hook(hook)


@contextmanager
def fake_quant_activations(storages: set[int], kind: str, group: int | None = None):
    """While active, F.linear fake-quantizes its input whenever its weight lives in one of `storages` (the HF
    model's quantized weights, HF 5's stacked experts included, which call F.linear per expert slice)."""
    linear = torch.nn.functional.linear

    def patched(x, weight, bias=None):
        if weight.untyped_storage().data_ptr() in storages:
            x = _fake_quant(x, kind, group=group)
        return linear(x, weight, bias)

    torch.nn.functional.linear = patched
    try:
        yield
    finally:
        torch.nn.functional.linear = linear
