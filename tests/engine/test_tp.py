"""Tensor parallelism on CPU: two ranks over gloo, one worker process beside the engine. The GPU (NCCL) variant
is in tests/engine/test_gpu_engine.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lmforge.check_env.parity import PREEMPTION, run_parity
from lmforge.engine.engine import Engine
from lmforge.messages import GenerationConfig, PytorchEngineConfig

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

# one family per kind of sharding: GQA attention + MLP, q/k norms, MoE experts, soft-capping and extra norms, MLA
FAMILIES = ["llama", "qwen3", "qwen3_moe", "gemma2", "deepseek_v3"]


@pytest.mark.parametrize("case", ["batch", "preemption"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_matches_hf(family, case):
    """Two ranks, each with half the heads, half the MLP / experts and half the KV cache, give HF's logits."""
    result = run_parity(family, engine_config={"tp": 2}, **({} if case == "batch" else PREEMPTION))
    assert result.passed, (result.max_abs_diff_per_step, result.engine_tokens, result.hf_tokens, result.notes)
    assert case == "batch" or result.num_preemptions > 0


def _greedy(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    ids = [engine.add_request(p, GenerationConfig(max_new_tokens=6, ignore_eos=True)) for p in prompts]
    tokens = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    return [tokens[i] for i in ids]


def test_engine_shards_the_model_and_stops_its_worker(tiny_llama_dir):
    prompts = [[5, 6, 7, 8], list(range(10, 40)), [3] * 9]
    cfg = dict(device_type="cpu", num_cpu_blocks=64, block_size=8, dtype="float32")
    single = Engine(tiny_llama_dir, PytorchEngineConfig(**cfg))
    expected = _greedy(single, prompts)
    engine = Engine(tiny_llama_dir, PytorchEngineConfig(tp=2, **cfg))
    worker = engine.executor.procs[0]
    assert worker.is_alive()
    attn = engine.model.model.layers[0].self_attn
    assert attn.qkv_proj.num_q_heads == 2 and attn.attn_fwd.num_heads == 2  # 4 heads over 2 ranks
    assert engine.executor.driver.cache.kv_caches[0][0].shape[2] == 1  # and 1 of the 2 KV heads per rank
    assert _greedy(engine, prompts) == expected
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.close()
    worker.join(30)
    assert worker.exitcode == 0


def test_a_model_that_does_not_split_fails_cleanly(tiny_llama_dir):
    with pytest.raises(ValueError, match="divisible by tp=3"):
        Engine(tiny_llama_dir, PytorchEngineConfig(device_type="cpu", tp=3, num_cpu_blocks=16))
    assert not dist.is_initialized()  # the workers were stopped and the group torn down: a new engine can start


def test_async_engine_serves_with_tp_and_stops_its_worker_on_close(tiny_llama_dir):
    """The server's path: the engine steps on its own thread; closing it stops the worker with exit code 0."""
    import asyncio

    from lmforge.engine.async_engine import AsyncEngine

    async def main() -> tuple[list[int], list]:
        aengine = AsyncEngine(
            tiny_llama_dir, PytorchEngineConfig(device_type="cpu", tp=2, num_cpu_blocks=32, block_size=8)
        )
        procs = aengine.engine.executor.procs
        tokens = []
        async for out in aengine.generate([5, 6, 7, 8], GenerationConfig(max_new_tokens=4, ignore_eos=True)):
            tokens += out.token_ids
        await aengine.close()
        return tokens, procs

    tokens, procs = asyncio.run(main())
    assert len(tokens) == 4
    for p in procs:
        p.join(30)
        assert p.exitcode == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_decodes_through_cuda_graphs_on_every_rank_with_eager_tokens(tiny_llama_dir):
    """CUDA graphs under tensor parallelism: both ranks capture the same buckets (the all-reduces inside the graphs),
    decode steps replay them, and the tokens are those of eager tp=2 steps."""
    prompts = [[5, 6, 7, 8], list(range(10, 40)), [3] * 9]
    cfg = dict(device_type="cuda", tp=2, num_gpu_blocks=64, block_size=16, max_batch_size=8)
    eager = Engine(tiny_llama_dir, PytorchEngineConfig(eager_mode=True, **cfg))
    expected = _greedy(eager, prompts)
    eager.close()
    engine = Engine(tiny_llama_dir, PytorchEngineConfig(**cfg))
    graphs = engine.graph_runner
    assert graphs is not None and graphs.enabled and graphs.graphs
    replays = []
    for graph in graphs.graphs.values():
        original = graph.replay
        graph.replay = lambda original=original: replays.append(1) or original()
    assert _greedy(engine, prompts) == expected
    assert replays  # the decode steps went through the graphs
    engine.close()
