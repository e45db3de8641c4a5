"""GPU memory profile: one forward of the largest prefill step on dummy tokens, before the KV cache
exists, to learn how much memory activations need on top of the weights."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from lmforge.engine import tp
from lmforge.engine.cache_engine import CacheEngine
from lmforge.engine.model_runner import ModelRunner
from lmforge.engine.scheduler import SchedulerOutput
from lmforge.engine.sequence import Sequence
from lmforge.messages import GenerationConfig

logger = logging.getLogger(__name__)


@torch.inference_mode()
def profile_peak_memory(engine) -> int:
    """Bytes the largest step needs beyond the weights (activations + logits of a full batch); with tensor
    parallelism, the largest over the ranks (each runs the same step on its shard)."""
    cfg = engine.engine_config
    num_tokens = min(cfg.max_prefill_token_num, engine.model_config.max_position_embeddings or 1 << 30, 16384)
    num_blocks = (num_tokens + cfg.block_size - 1) // cfg.block_size
    channel = engine.tp.channel if engine.tp is not None else None
    if channel is not None:
        channel.send(tp.PROFILE, num_blocks)
    seq = Sequence(-1, "profile", [0] * num_tokens, num_tokens, GenerationConfig(max_new_tokens=1))
    seq.block_ids = list(range(num_blocks))

    def step(runner: ModelRunner) -> None:
        runner.forward(SchedulerOutput([seq], [num_tokens]), [0])

    peak = _measure(
        step,
        engine.model,
        engine.ctx_mgr,
        engine.model_config,
        cfg.block_size,
        engine.dtype,
        engine.device,
        channel,
        num_blocks,
    )
    # the sampler holds a few [batch, vocab] float32 tensors at once
    batch = max(1, min(cfg.max_batch_size or 256, 256))
    peak += 4 * batch * engine.model_config.vocab_size * 4
    if channel is not None:
        peak = channel.reduce_int(peak, dist.ReduceOp.MAX)
    logger.info("profile: a %d-token step needs %.2f GiB of activations", num_tokens, peak / 2**30)
    return int(peak)


def follow_profile(model, ctx_mgr, model_config, block_size, dtype, device, channel, num_blocks: int) -> None:
    """A tensor-parallel rank > 0 during rank 0's profile_peak_memory: the same step on its shard."""

    def step(runner: ModelRunner) -> None:
        runner.follow(channel.recv()[1:])

    peak = _measure(step, model, ctx_mgr, model_config, block_size, dtype, device, channel, num_blocks)
    channel.reduce_int(peak, dist.ReduceOp.MAX)


def _measure(step, model, ctx_mgr, model_config, block_size, dtype, device, channel, num_blocks: int) -> int:
    """Peak bytes allocated during `step(runner)` on a temporary cache of num_blocks blocks."""
    tp_size = channel.world if channel is not None else 1
    cache = CacheEngine(model_config, num_blocks, block_size, dtype, device, tp_size=tp_size)
    runner = ModelRunner(model, ctx_mgr, cache.kv_caches, block_size, device, channel=channel)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(runner)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del cache, runner
    torch.cuda.empty_cache()
    return int(peak)
