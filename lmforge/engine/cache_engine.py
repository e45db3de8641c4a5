"""CacheEngine: allocates the paged KV cache, per layer a key and a value tensor of
[num_blocks + 1, block_size, num_kv_heads, head_dim] (k and v head sizes may differ; MLA models keep one latent
tensor per layer; the extra block is the trash block), sized from free memory or an explicit count."""

from __future__ import annotations

import logging

import numpy as np
import torch

from lmforge.config import CacheConfig, ModelConfig

logger = logging.getLogger(__name__)

_CPU_CACHE_CAP_BYTES = 4 << 30


def bytes_per_block(model_config: ModelConfig, block_size: int, dtype: torch.dtype, tp_size: int = 1) -> int:
    kv_heads = max(1, model_config.num_key_value_heads // tp_size)
    per_token = kv_heads * (
        model_config.k_head_dim + (model_config.v_head_dim if model_config.num_kv_caches == 2 else 0)
    )
    return per_token * block_size * model_config.num_layers * torch.finfo(dtype).bits // 8


def num_cpu_blocks(model_config: ModelConfig, cache_config: CacheConfig, dtype: torch.dtype) -> int:
    if cache_config.num_cpu_blocks:
        return cache_config.num_cpu_blocks
    import psutil

    budget = min(psutil.virtual_memory().available * 0.25, _CPU_CACHE_CAP_BYTES)
    return max(1, int(budget // bytes_per_block(model_config, cache_config.block_size, dtype)))


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
    per_block = bytes_per_block(model_config, cache_config.block_size, dtype, tp_size)
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
    ):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.trash_block = num_blocks
        num_blocks += 1
        kv_heads = max(1, model_config.num_key_value_heads // tp_size)
        k_shape = (num_blocks, block_size, kv_heads, model_config.k_head_dim)
        v_shape = (num_blocks, block_size, kv_heads, model_config.v_head_dim)
        self.kv_caches: list[tuple[torch.Tensor, ...]] = []
        for _ in range(model_config.num_layers):
            k = _cache_tensor(k_shape, dtype, device)
            if model_config.num_kv_caches == 2:
                self.kv_caches.append((k, _cache_tensor(v_shape, dtype, device)))
            else:
                self.kv_caches.append((k, k))
        self.nbytes = sum(t.numel() * t.element_size() for layer in self.kv_caches for t in set(layer))


def _cache_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cache tensor whose unwritten slots are zeros, not garbage (NaN there would leak through masked
    attention as 0 * NaN). On CPU the zeros come from calloc via numpy, so pages are committed only when
    a block is first written; on GPU the kernels never read unwritten slots, so empty memory is fine."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = np.zeros((*shape[:-1], shape[-1] * itemsize), dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype)
