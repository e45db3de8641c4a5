"""Engine start-up decisions (device, dtype) and the warm-up burst that runs before serving."""

from __future__ import annotations

import logging

import torch

from lmforge.messages import GenerationConfig

logger = logging.getLogger(__name__)


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
        native = _cpu_has_native_bf16()
        chosen = torch.bfloat16 if native else torch.float32
        logger.info(
            "dtype auto on CPU: %s (%s)",
            str(chosen).removeprefix("torch."),
            "native bf16: avx512_bf16/amx_bf16" if native else "no native bf16 (avx512_bf16/amx_bf16 absent)",
        )
        return chosen
    stored = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
    if stored in (torch.float16, "float16"):
        return torch.float16
    return torch.bfloat16


def warmup(engine) -> None:
    """Run a small burst through the real loop at start: prefill chunks short and long (one a full
    max_prefill_token_num chunk), mixed and decode steps, greedy and sampled rows, logprobs. Kernel
    compilation and library autotuning then happen here, not under the first real requests."""
    limit = engine.session_len - 8
    lengths = sorted({min(n, limit) for n in (1, 17, 100, 333, 1100, engine.engine_config.max_prefill_token_num + 50)})
    for i, n in enumerate(lengths):
        gen = GenerationConfig(
            max_new_tokens=4,
            ignore_eos=True,
            do_sample=bool(i % 2),
            temperature=0.7,
            logprobs=2 if i == 2 else None,
        )
        engine.add_request([(i + 3) % engine.vocab_size] * n, gen, request_id=f"warmup-{i}")
        engine.step()
    while engine.has_unfinished():
        engine.step()
    engine.prompt_tokens_total = engine.generation_tokens_total = 0
    engine.step_stats = dict.fromkeys(engine.step_stats, 0)
    engine.block_manager.num_cache_hit_tokens = 0
    engine.scheduler.num_preemptions = 0
