"""GPU memory profile: one forward of the largest prefill step on dummy tokens, before the KV cache
exists, to learn how much memory activations need on top of the weights."""

from __future__ import annotations

import logging

import torch

from lmforge.engine.cache_engine import CacheEngine
from lmforge.engine.model_runner import ModelRunner
from lmforge.engine.scheduler import SchedulerOutput
from lmforge.engine.sequence import Sequence
from lmforge.messages import GenerationConfig

logger = logging.getLogger(__name__)


@torch.inference_mode()
def profile_peak_memory(engine) -> int:
    """Bytes the largest step needs beyond the weights (activations + logits of a full batch)."""
    cfg = engine.engine_config
    num_tokens = min(cfg.max_prefill_token_num, engine.model_config.max_position_embeddings or 1 << 30, 16384)
    block_size = cfg.block_size
    num_blocks = (num_tokens + block_size - 1) // block_size
    cache = CacheEngine(engine.model_config, num_blocks, block_size, engine.dtype, engine.device)
    seq = Sequence(-1, "profile", [0] * num_tokens, num_tokens, GenerationConfig(max_new_tokens=1))
    seq.block_ids = list(range(num_blocks))
    runner = ModelRunner(engine.model, engine.ctx_mgr, cache.kv_caches, block_size, engine.device)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    batch = max(1, min(cfg.max_batch_size or 256, 256))
    runner.forward(SchedulerOutput([seq], [num_tokens]), [0])
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # the sampler holds a few [batch, vocab] float32 tensors at once
    peak += 4 * batch * engine.model_config.vocab_size * 4
    del cache, runner
    torch.cuda.empty_cache()
    logger.info("profile: a %d-token step needs %.2f GiB of activations", num_tokens, peak / 2**30)
    return int(peak)
