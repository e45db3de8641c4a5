"""Engine start-up decisions: the device and the dtype."""

from __future__ import annotations

import torch


def resolve_device_type(device_type: str | None) -> str:
    if device_type is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device_type='cuda' was asked for but torch sees no CUDA device; use device_type='cpu'")
    return device_type


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(dtype: str, hf_config, device_type: str) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device_type == "cpu":
        # bf16 halves the bytes a memory-bound CPU decode moves, but only pays where the CPU computes it natively
        return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32
    stored = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
    if stored in (torch.float16, "float16"):
        return torch.float16
    return torch.bfloat16
