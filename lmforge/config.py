"""Engine-level configuration: what the engine sizes itself from.

HF config -> ConfigBuilder (lmforge.configurations) -> ModelConfig -> engine and model.
CacheConfig and SchedulerConfig are derived from the user's PytorchEngineConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(slots=True)
class ModelConfig:
    """What the engine needs to know about a model; built by an AutoModelConfigBuilder."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    head_dim: int
    vocab_size: int
    # head sizes of the KV cache, when they differ from head_dim (MLA stores a compressed latent)
    k_head_dim: int | None = None
    v_head_dim: int | None = None
    sliding_window: int | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False
    # number of KV caches per layer: 2 for (key, value); MLA keeps one latent cache and sets 1
    num_kv_caches: int = 2
    dtype: torch.dtype = torch.float16
    hf_config: Any = None
    model_arch: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.k_head_dim is None:
            self.k_head_dim = self.head_dim
        if self.v_head_dim is None:
            self.v_head_dim = self.head_dim

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        if eos is None:
            return []
        return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


@dataclass(slots=True)
class CacheConfig:
    block_size: int
    num_gpu_blocks: int = 0
    num_cpu_blocks: int = 0
    cache_max_entry_count: float = 0.8
    enable_prefix_caching: bool = False
    quant_policy: int = 0  # KV cache: 0 the model dtype, 8 int8, 4 int4 (lmforge.engine.cache_engine)
    # 'auto' (the model dtype, or quant_policy's), 'fp8' (float8_e4m3fn), 'float16' or 'float32'; the worker
    # resolves PytorchEngineConfig's 'auto' (lmforge.engine.startup.resolve_dtypes) before it reaches here
    kv_cache_dtype: str = "auto"

    @property
    def num_blocks(self) -> int:
        return self.num_gpu_blocks or self.num_cpu_blocks


@dataclass(slots=True)
class SchedulerConfig:
    max_batch_size: int
    max_session_len: int
    max_prefill_token_num: int
    enable_chunked_prefill: bool = True
