"""Tensor parallelism on Ray: a local Ray cluster (this test's own, two CPU worker slots) runs rank 1 as a Ray actor
over gloo with the same Worker code as a local process; tp=2 gives tp=1's greedy tokens, and closing the engine
stops the actor and the cluster it started, leaving no process behind."""

from __future__ import annotations

import os

import psutil
import pytest

from lmforge.engine.engine import Engine
from lmforge.engine.executor import RayExecutor
from lmforge.messages import GenerationConfig, PytorchEngineConfig

ray = pytest.importorskip("ray")


def _greedy(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    ids = [engine.add_request(p, GenerationConfig(max_new_tokens=6, ignore_eos=True)) for p in prompts]
    tokens = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    return [tokens[i] for i in ids]


def test_ray_tp2_equals_tp1_and_leaves_no_process(tiny_llama_dir, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        pytest.skip("Ray is already initialized in this process")
    prompts = [[5, 6, 7, 8], list(range(10, 40)), [3] * 9]
    cfg = dict(device_type="cpu", num_cpu_blocks=64, block_size=8, dtype="float32")
    expected = _greedy(Engine(tiny_llama_dir, PytorchEngineConfig(**cfg)), prompts)
    before = {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)}
    engine = Engine(tiny_llama_dir, PytorchEngineConfig(tp=2, distributed_executor_backend="ray", **cfg))
    try:
        assert isinstance(engine.executor, RayExecutor) and engine.executor._started_ray
        attn = engine.model.model.layers[0].self_attn
        assert attn.qkv_proj.num_q_heads == 2  # rank 0 holds half of the 4 heads; the actor the other half
        assert _greedy(engine, prompts) == expected
        started = [p for p in psutil.Process(os.getpid()).children(recursive=True) if p.pid not in before]
        assert started  # the cluster's processes (GCS, raylet, the actor's worker), which close() must stop
    finally:
        engine.close()
    assert not ray.is_initialized()
    left = [p for p in psutil.Process(os.getpid()).children(recursive=True) if p.pid not in before]
    gone, alive = psutil.wait_procs(left, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [p.cmdline()[:3] for p in alive]
