"""Engine start-up decisions: the device, the dtype and the Triton kernel cache."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from concurrent.futures import Future

import torch

logger = logging.getLogger(__name__)
_logged_triton_cache: set[str] = set()


def lmforge_cache_dir() -> str:
    """`$XDG_CACHE_HOME/lmforge` (`~/.cache/lmforge`): the default Triton kernel cache and the memory profiles."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lmforge")


def default_triton_cache_dir() -> str:
    return os.path.join(lmforge_cache_dir(), "triton")


def configure_triton_cache() -> tuple[str, int]:
    """Point Triton's on-disk kernel cache at TRITON_CACHE_DIR when the user set it, else at
    `$XDG_CACHE_HOME/lmforge/triton` (`~/.cache/lmforge/triton`), so the kernels compile once and later starts
    load them. Set in the environment, so TP worker processes started afterwards share it. Returns the folder
    and how many compiled kernels it held at start (0: a cold start), logged once per folder."""
    path = os.environ.get("TRITON_CACHE_DIR")
    if not path:
        path = os.environ["TRITON_CACHE_DIR"] = default_triton_cache_dir()
    try:
        os.makedirs(path, exist_ok=True)
        entries = len(os.listdir(path))  # one folder per compiled kernel (hash of source, options, target)
    except OSError as e:
        raise RuntimeError(f"Triton kernel cache folder {path} cannot be used ({e}); set TRITON_CACHE_DIR") from e
    if path not in _logged_triton_cache:
        _logged_triton_cache.add(path)
        logger.info("Triton kernel cache: %s (%d entries at start%s)", path, entries, ": cold" if not entries else "")
    return path, entries


_gil_lock = threading.Lock()
_gil_users = 0
_gil_previous = 0.005


@contextlib.contextmanager
def short_gil_switch(interval_s: float = 0.001):
    """During start-up, threads hand the GIL over after `interval_s` instead of Python's 5 ms: the tokenizer
    thread's `import transformers` runs beside the weight readers and the main thread's launches, and each of
    their short GIL needs (a read done, a copy queued) would otherwise wait up to 5 ms for it. Engines starting
    at once share it: the last one to finish restores the interval."""
    global _gil_users, _gil_previous
    with _gil_lock:
        if _gil_users == 0:
            _gil_previous = sys.getswitchinterval()
            sys.setswitchinterval(min(_gil_previous, interval_s))
        _gil_users += 1
    try:
        yield
    finally:
        with _gil_lock:
            _gil_users -= 1
            if _gil_users == 0:
                sys.setswitchinterval(_gil_previous)


def start_cuda_context() -> threading.Thread:
    """Start CUDA (driver init and the device's context, most of it in the driver with the GIL released) on a
    thread, while the main thread imports the CUDA backend's modules (Triton and the kernels). Errors are left to
    the main thread's first CUDA call, which raises them."""

    def run() -> None:
        try:
            torch.cuda.init()
            torch.empty(1, device=torch.device("cuda", torch.cuda.current_device()))
        except Exception:  # noqa: BLE001 - re-raised by the engine's own first CUDA call
            pass

    thread = threading.Thread(target=run, name="lmforge-cuda-init", daemon=True)
    thread.start()
    return thread


def start_weight_prefetch(model_path: str | None) -> None:
    """Read the weight files ahead into the page cache on a daemon thread (weights.files.prefetch_weight_files)
    while CUDA starts and the model is built; errors are left to the real load, which names them."""
    from lmforge.model_source import resolve_model_path
    from lmforge.weights.files import WeightFileError, prefetch_weight_files

    try:
        path = resolve_model_path(model_path)
    except (OSError, WeightFileError):  # the real load reports it, with its own message
        return
    threading.Thread(target=prefetch_weight_files, args=(path,), name="lmforge-prefetch", daemon=True).start()


def resolve_device_type(device_type: str | None) -> str:
    if device_type is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(  # a setting to change, like any other bad option
            "CUDA was asked for, but torch sees no CUDA device; run on the CPU with `--device cpu` "
            "(PytorchEngineConfig(device_type='cpu') from Python)"
        )
    return device_type


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_dtypes(
    dtype: str, hf_config, device_type: str, kv_cache_dtype: str = "auto", quant_policy: int = 0
) -> tuple[torch.dtype, str]:
    """PytorchEngineConfig's dtype and kv_cache_dtype made concrete: (the compute dtype, the KV cache format).

    On CPU, dtype 'auto' is bfloat16 where the CPU computes it natively, else float32, and with float32 compute an
    'auto' KV cache is float16 where lmforge's CPU attention kernel reads it (half the bytes for the memory-bound
    paged attention, ~2^-11 relative rounding of each stored value); an explicit dtype, kv_cache_dtype='float32' or
    a quant_policy keeps the cache as named. On CUDA a named float cache dtype must be the model's: the GPU kernels
    keep keys and values in it."""
    if dtype != "auto":
        chosen = getattr(torch, dtype)
    elif device_type == "cpu":
        # bf16 halves the bytes a memory-bound CPU decode moves, but only pays where the CPU computes it natively
        native = _cpu_has_native_bf16()
        chosen = torch.bfloat16 if native else torch.float32
        kv_words = _kv_cache_words(kv_cache_dtype, quant_policy, chosen)
        if kv_cache_dtype == "auto" and not quant_policy and chosen == torch.float32:
            kept = _float32_cache_reason(hf_config)
            kv_cache_dtype = "auto" if kept else "float16"
            kv_words = f"float32 ({kept})" if kept else _kv_cache_words(kv_cache_dtype, quant_policy, chosen)
        logger.info(
            "dtype auto on CPU: %s (%s), KV cache %s",
            str(chosen).removeprefix("torch."),
            "native bf16: avx512_bf16/amx_bf16" if native else "no native bf16 (avx512_bf16/amx_bf16 absent)",
            kv_words,
        )
    else:
        stored = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
        chosen = torch.float16 if stored in (torch.float16, "float16") else torch.bfloat16
    if device_type == "cuda" and kv_cache_dtype in ("float16", "fp16", "float32", "fp32"):
        from .cache_engine import cache_dtype

        if cache_dtype(kv_cache_dtype, chosen) != chosen:
            raise ValueError(
                f"kv_cache_dtype={kv_cache_dtype!r} on CUDA needs the model dtype {kv_cache_dtype!r} too (the GPU "
                f"kernels keep keys and values in the model dtype, {str(chosen).removeprefix('torch.')} here): use "
                "kv_cache_dtype='auto', or 'fp8' / quant_policy 8 or 4 for a smaller cache"
            )
    return chosen, kv_cache_dtype


def _float32_cache_reason(hf_config) -> str | None:
    """Why an 'auto' CPU cache under float32 compute stays float32, or None: float16 pays only where the CPU kernel
    reads it (1.4x faster than a float32 cache at 32 sequences x 200 tokens on a 2-core AVX-512 Xeon,
    benchmarks/cpu_attention.py), while torch's path, which widens the gathered keys with one more copy a layer, is
    1.2-1.6x slower with it; the kernel declines softcapped attention."""
    from lmforge.kernels import cpu as cpu_kernels

    if not cpu_kernels.available():
        return "the CPU kernels are off: torch's attention reads a float16 cache slower"
    if getattr(hf_config, "attn_logit_softcapping", None):
        return "softcapped attention runs torch's path, which reads a float16 cache slower"
    return None


def _kv_cache_words(kv_cache_dtype: str, quant_policy: int, dtype: torch.dtype) -> str:
    if quant_policy:
        return f"int{quant_policy} (quant_policy={quant_policy})"
    if kv_cache_dtype == "float16" and dtype == torch.float32:
        return "float16 (half the bytes the paged attention reads; kv_cache_dtype='float32' keeps float32)"
    return str(dtype).removeprefix("torch.") if kv_cache_dtype == "auto" else kv_cache_dtype


def in_daemon_thread(name: str, fn, *args) -> Future:
    """fn(*args) on a daemon thread named `name`, its result or exception in the returned Future: start-up work
    abandoned by Ctrl-C must not hold the exiting process for as long as it takes (a ThreadPoolExecutor's worker
    would be joined at exit)."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
