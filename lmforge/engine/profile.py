"""GPU memory profile: one forward of the largest prefill step on dummy tokens, before the KV cache
exists, to learn how much memory activations need on top of the weights. Used by engine.worker.Worker."""

from __future__ import annotations

import torch

from lmforge.config import ModelConfig
from lmforge.messages import GenerationConfig

from .cache_engine import CacheEngine
from .model_runner import ModelRunner, ModelStep
from .scheduler import SchedulerOutput
from .sequence import Sequence


def profile_num_tokens(max_prefill_token_num: int, model_config: ModelConfig) -> int:
    """Tokens of the profile step: the largest prefill chunk a step may run."""
    return min(max_prefill_token_num, model_config.max_position_embeddings or 1 << 30, 16384)


@torch.inference_mode()
def peak_step_memory(
    step: ModelStep,
    model_config: ModelConfig,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    num_tokens: int,
    channel=None,
    outside: dict | None = None,
) -> int:
    """Peak bytes allocated by one num_tokens prefill step on a temporary cache. Rank 0 (or a single rank) builds
    and runs the step; with tensor parallelism it broadcasts it over `channel` and the other ranks (rank > 0)
    follow it on their shards. `outside` (when given, a dict) gets `bytes`: how much less device memory is free
    after the step than before it, all of it (kernel modules and library handles the first step loads)."""
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info(device)[0]
    num_blocks = (num_tokens + block_size - 1) // block_size
    tp_size = channel.world if channel is not None else 1
    cache = CacheEngine(model_config, num_blocks, block_size, dtype, device, tp_size=tp_size)
    runner = ModelRunner(step, cache.kv_caches, block_size, device, channel=channel)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    if channel is None or channel.rank == 0:
        seq = Sequence(-1, "profile", [0] * num_tokens, num_tokens, GenerationConfig(max_new_tokens=1))
        seq.block_ids = list(range(num_blocks))
        runner.forward(SchedulerOutput([seq], [num_tokens]), [0])
    else:
        runner.follow(channel.recv()[1:])
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del cache, runner
    torch.cuda.empty_cache()
    if outside is not None:
        outside["bytes"] = max(0, free_before - torch.cuda.mem_get_info(device)[0])
    return int(peak)
