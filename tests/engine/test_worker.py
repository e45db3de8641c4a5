"""The Worker alone (no Engine): a rank builds, sizes its cache and runs a step whose logits are HF's; and the
engine package's modules import each other without a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from lmforge.engine.scheduler import SchedulerOutput
from lmforge.engine.sequence import Sequence
from lmforge.engine.worker import Worker
from lmforge.messages import GenerationConfig, PytorchEngineConfig

ENGINE_DIR = Path(__file__).resolve().parents[2] / "lmforge" / "engine"


def test_a_worker_runs_a_step_by_itself_and_matches_hf(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    cfg = PytorchEngineConfig(device_type="cpu", dtype="float32", num_cpu_blocks=8, block_size=8)
    worker = Worker(tiny_llama_dir, cfg, torch.device("cpu"))
    worker.load_model()
    assert worker.determine_num_blocks(max_batch_size=4) == 8  # --num-cpu-blocks, as asked
    worker.init_cache(8)
    prompts = [[5, 6, 7, 8, 9], list(range(20, 31))]
    seqs = []
    for i, ids in enumerate(prompts):
        seq = Sequence(i, f"r{i}", list(ids), len(ids), GenerationConfig(max_new_tokens=1))
        seq.block_ids = [2 * i, 2 * i + 1]
        seqs.append(seq)
    logits = worker.execute(SchedulerOutput(seqs, [len(p) for p in prompts]), [0, 1])
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        expected = torch.stack([hf(torch.tensor([p])).logits[0, -1] for p in prompts])
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=2e-4)


def _imports(path: Path) -> set[str]:
    """The lmforge.engine modules a module imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
            elif node.module and node.module.startswith("lmforge.engine"):
                rest = node.module.removeprefix("lmforge.engine").lstrip(".")
                names = [rest] if rest else [a.name for a in node.names]
            else:
                continue
            found.update(n.split(".")[0] for n in names)
    return {n for n in found if (ENGINE_DIR / f"{n}.py").exists()} - {path.stem}


def test_the_engine_modules_import_no_cycle():
    graph = {p.stem: _imports(p) for p in ENGINE_DIR.glob("*.py") if p.stem != "__init__"}
    rank_side = ("worker", "executor", "model_runner", "profile", "cuda_graph", "tp", "cache_engine")
    for name in rank_side:  # what runs a rank never reaches back into the Engine
        assert "engine" not in graph[name], name
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


class _ScriptedChannel:
    """A channel whose driver side records what it sends and whose follower side replays a script."""

    world, rank = 2, 1

    def __init__(self, script: list[list[int]]):
        self.script, self.sent, self.reduced = list(script), [], []

    def send(self, cmd: int, *args: int) -> None:
        self.sent.append([cmd, *args])

    def recv(self) -> list[int]:
        return self.script.pop(0)

    def send_step(self, sizes, flat64, flat32) -> None:
        self.sent.append(["step", *sizes])

    def reduce_int(self, value: int, op) -> int:
        self.reduced.append(value)
        return value


class _RecordingGraphs:
    """Stands in for CudaGraphRunner on CPU: records how it was built and replays by running the model eagerly."""

    built: list = []

    def __init__(self, step, cache, block_size, device, max_batch_size, max_blocks, **kw):
        self.step = step
        _RecordingGraphs.built.append((max_batch_size, max_blocks, cache.num_blocks))
        self.replays = 0
        self.enabled, self.graphs = True, {16: None, 8: None}
        self.kept = None

    def keep_largest(self, n: int) -> None:
        self.kept = n

    def can_run(self, ctx) -> bool:
        return ctx.is_decoding

    def run(self, ctx):
        self.replays += 1
        return self.step.forward(ctx)


def test_graph_capture_reaches_every_rank_and_decode_steps_replay_on_followers(tiny_llama_dir, monkeypatch):
    """CUDA graphs under tensor parallelism, on CPU: the driver's capture is a GRAPHS command that a following rank
    acts on with the same batch limits, after its cache exists; then its decode steps go through the graphs and its
    prefill steps run eagerly, as on the driver (the real capture runs on the GPU: tests/engine/test_gpu_engine.py)."""
    from lmforge.engine import cuda_graph, tp

    monkeypatch.setattr(cuda_graph, "CudaGraphRunner", _RecordingGraphs)
    _RecordingGraphs.built = []
    cfg = PytorchEngineConfig(device_type="cpu", dtype="float32", num_cpu_blocks=8, block_size=8)
    # both ranks hold the whole model (a one-way split) so that the test needs no process group: what it checks is
    # which commands the driver sends and what a following rank does with them
    driver_channel = _ScriptedChannel([])
    driver_channel.rank = 0
    driver = Worker(tiny_llama_dir, cfg, torch.device("cpu"), 0, driver_channel)
    driver.world_size = 1
    driver.load_model()
    driver.init_cache(8)
    driver.capture_graphs(16, 4)
    assert driver_channel.sent == [[tp.ALLOC, 8], [tp.GRAPHS, 16, 4]]
    follower = Worker(tiny_llama_dir, cfg, torch.device("cpu"), 0, _ScriptedChannel(driver_channel.sent + [[tp.STOP]]))
    follower.world_size = 1
    follower.load_model()
    follower.rank = 1  # from here on it follows
    follower.serve()
    assert _RecordingGraphs.built == [(16, 4, 8), (16, 4, 8)]  # the driver's and the follower's, alike
    assert follower.runner.graph_runner is follower.graph_runner
    # the ranks agree on the buckets they all captured (the count is min-reduced over the ranks)
    assert driver_channel.reduced == [2] and follower.channel.reduced == [2] and follower.graph_runner.kept == 2
    seq = Sequence(0, "r", [5, 6, 7], 3, GenerationConfig(max_new_tokens=2))
    seq.block_ids = [0]
    with torch.inference_mode():  # as in serve(), where the cache was made
        prefill, _ = follower.runner.build_context(SchedulerOutput([seq], [3]))
        follower.runner._run(prefill)
        assert follower.graph_runner.replays == 0
        seq.num_computed_tokens = 2
        decode, _ = follower.runner.build_context(SchedulerOutput([seq], [1]))
        follower.runner._run(decode)
    assert follower.graph_runner.replays == 1


def test_weights_loaded_on_a_thread_equal_a_foreground_load(tiny_llama_dir, tmp_path):
    """load_model(background=True): the same parameters once wait_weights has joined; a load error is raised
    there, naming the file."""
    import shutil

    import pytest

    from lmforge.weights.errors import WeightFileError

    cfg = PytorchEngineConfig(device_type="cpu", dtype="float32", num_cpu_blocks=8, block_size=8)
    fore, back = Worker(tiny_llama_dir, cfg, torch.device("cpu")), Worker(tiny_llama_dir, cfg, torch.device("cpu"))
    fore.load_model()
    back.load_model(background=True)
    back.wait_weights()
    back.wait_weights()  # joined once; a second call is a no-op
    theirs = dict(back.model.named_parameters())
    for name, param in fore.model.named_parameters():
        assert torch.equal(param, theirs[name]), name

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    weights = next(broken.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    worker = Worker(str(broken), cfg, torch.device("cpu"))
    with pytest.raises(WeightFileError, match="corrupt or truncated"):
        worker.load_model(background=True)
        worker.wait_weights()
