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
