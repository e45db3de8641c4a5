"""CacheEngine: allocates the paged KV cache, per layer a key and a value tensor of
[num_blocks + 1, block_size, num_kv_heads, head_dim] (k and v head sizes may differ; MLA models keep one latent
tensor per layer; the extra block is the trash block), sized from free memory or an explicit count.

The cache format: the model dtype; `kv_cache_dtype='fp8'` float8_e4m3fn (scale 1.0); 'float16' / 'float32' that
float dtype (on CPU below float32 compute, the default under dtype 'auto': see startup.resolve_dtypes); `quant_policy`
8 / 4 a QuantizedCache per key and value (uint8 codes plus a float32 (scale, zero point) per token and head), which
the backend ops quantize on write and dequantize on read. Smaller blocks mean more of them in the same memory."""

from __future__ import annotations

import logging

import numpy as np
import torch

from lmforge.config import CacheConfig, ModelConfig
from lmforge.messages import KV_CACHE_DTYPES
from lmforge.model_inputs import QuantizedCache

logger = logging.getLogger(__name__)

_CPU_CACHE_CAP_BYTES = 4 << 30


# bytes of one (scale, zero point) pair of a quantized cache row
_SCALES_ZEROS_BYTES = 2 * 4
# kv_cache_dtype names of a cache dtype other than the model's ('auto': the model dtype)
_NAMED_DTYPES = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def cache_dtype(kv_cache_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of an unquantized cache's tensors: kv_cache_dtype's, or the model dtype for 'auto'."""
    return _NAMED_DTYPES.get(kv_cache_dtype, dtype)


def check_kv_cache_format(model_config: ModelConfig, quant_policy: int = 0, kv_cache_dtype: str = "auto") -> None:
    """Refuse a cache format the model cannot use, naming the option."""
    if quant_policy not in (0, 4, 8):
        raise ValueError(f"quant_policy must be 0 (off), 4 (int4) or 8 (int8) KV cache, got {quant_policy!r}")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be 'auto', 'fp8' (e4m3), 'float16' or 'float32', got {kv_cache_dtype!r}")
    if quant_policy and kv_cache_dtype != "auto":
        raise ValueError(f"quant_policy and kv_cache_dtype={kv_cache_dtype!r} are two KV cache formats: choose one")
    if quant_policy and model_config.num_kv_caches != 2:
        raise ValueError(
            f"quant_policy={quant_policy} is not supported for a model with one shared latent KV cache (MLA, e.g. "
            "DeepSeek-V3): use quant_policy=0, or kv_cache_dtype='fp8'"
        )
    if quant_policy == 4 and (model_config.k_head_dim % 2 or model_config.v_head_dim % 2):
        raise ValueError(
            f"quant_policy=4 packs two channels a byte and needs even head dims, got {model_config.k_head_dim}"
        )


def _bytes_per_row(head_dim: int, dtype: torch.dtype, quant_policy: int, kv_cache_dtype: str) -> int:
    if quant_policy:
        return head_dim * quant_policy // 8 + _SCALES_ZEROS_BYTES
    return head_dim * torch.finfo(cache_dtype(kv_cache_dtype, dtype)).bits // 8


def bytes_per_block(
    model_config: ModelConfig,
    block_size: int,
    dtype: torch.dtype,
    tp_size: int = 1,
    quant_policy: int = 0,
    kv_cache_dtype: str = "auto",
) -> int:
    kv_heads = max(1, model_config.num_key_value_heads // tp_size)
    per_head = _bytes_per_row(model_config.k_head_dim, dtype, quant_policy, kv_cache_dtype)
    if model_config.num_kv_caches == 2:
        per_head += _bytes_per_row(model_config.v_head_dim, dtype, quant_policy, kv_cache_dtype)
    return kv_heads * per_head * block_size * model_config.num_layers


def num_cpu_blocks(model_config: ModelConfig, cache_config: CacheConfig, dtype: torch.dtype) -> int:
    if cache_config.num_cpu_blocks:
        return cache_config.num_cpu_blocks
    import psutil

    budget = min(psutil.virtual_memory().available * 0.25, _CPU_CACHE_CAP_BYTES)
    per_block = bytes_per_block(
        model_config, cache_config.block_size, dtype, 1, cache_config.quant_policy, cache_config.kv_cache_dtype
    )
    return max(1, int(budget // per_block))


def num_gpu_blocks(
    model_config: ModelConfig,
    cache_config: CacheConfig,
    dtype: torch.dtype,
    device: torch.device,
    reserved_bytes: int = 0,
    tp_size: int = 1,
) -> int:
    """Blocks that fit in cache_max_entry_count of the memory free after the weights, less what the
    largest step's activations need (reserved_bytes, from the profile run)."""
    if cache_config.num_gpu_blocks:
        return cache_config.num_gpu_blocks
    free, _ = torch.cuda.mem_get_info(device)
    per_block = bytes_per_block(
        model_config, cache_config.block_size, dtype, tp_size, cache_config.quant_policy, cache_config.kv_cache_dtype
    )
    usable = free * cache_config.cache_max_entry_count - reserved_bytes
    if usable < per_block:
        raise RuntimeError(
            f"no GPU memory left for the KV cache ({free / 2**30:.1f} GiB free, activations need "
            f"{reserved_bytes / 2**30:.1f} GiB); lower max_prefill_token_num or use a smaller model"
        )
    return int(usable // per_block)


class CacheEngine:
    """Holds num_blocks + 1 blocks: the extra last one (`trash_block`) absorbs the writes of padding
    rows in CUDA-graph batches and is never handed to a sequence."""

    def __init__(
        self,
        model_config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        tp_size: int = 1,
        quant_policy: int = 0,
        kv_cache_dtype: str = "auto",
    ):
        check_kv_cache_format(model_config, quant_policy, kv_cache_dtype)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.quant_policy, self.kv_cache_dtype = quant_policy, kv_cache_dtype
        self.trash_block = num_blocks
        num_blocks += 1
        kv_heads = max(1, model_config.num_key_value_heads // tp_size)
        dtype = cache_dtype(kv_cache_dtype, dtype)

        def cache(head_dim: int) -> torch.Tensor | QuantizedCache:
            if not quant_policy:
                return _cache_tensor((num_blocks, block_size, kv_heads, head_dim), dtype, device)
            codes = (num_blocks, block_size, kv_heads, head_dim * quant_policy // 8)
            scales_zeros = _cache_tensor((num_blocks, block_size, kv_heads, 2), torch.float32, device)
            return QuantizedCache(_cache_tensor(codes, torch.uint8, device), scales_zeros, quant_policy)

        self.kv_caches: list[tuple[torch.Tensor | QuantizedCache, ...]] = []
        for _ in range(model_config.num_layers):
            k = cache(model_config.k_head_dim)
            self.kv_caches.append((k, cache(model_config.v_head_dim) if model_config.num_kv_caches == 2 else k))
        tensors = {id(t): t for layer in self.kv_caches for c in layer for t in _tensors(c)}
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors.values())


def _tensors(cache: torch.Tensor | QuantizedCache) -> tuple[torch.Tensor, ...]:
    return (cache.data, cache.scales_zeros) if isinstance(cache, QuantizedCache) else (cache,)


def _cache_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cache tensor whose unwritten slots are zeros, not garbage (NaN there would leak through masked
    attention as 0 * NaN). On CPU the zeros come from calloc via numpy, so pages are committed only when
    a block is first written; on GPU the kernels never read unwritten slots, so empty memory is fine."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = np.zeros((*shape[:-1], shape[-1] * itemsize), dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype)
