"""Executors: where an Engine's Workers run. The Engine talks to one executor; each holds the driver Worker
(rank 0, in the Engine's process) and starts the other ranks, if any:

    UniprocExecutor      one rank, no process group
    MultiprocExecutor    tensor-parallel ranks 1..tp-1 as local processes (torch.multiprocessing, spawn)
    RayExecutor          the same ranks as Ray actors placed on a Ray cluster's nodes (engine/ray_executor.py)

Every rank is the same engine.worker.Worker; the driver broadcasts each command to the others over tp.Channel.
"""

from __future__ import annotations

import atexit
import logging

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmforge.messages import PytorchEngineConfig

from . import tp
from .scheduler import SchedulerOutput
from .worker import Worker, run_worker

logger = logging.getLogger(__name__)


class Executor:
    """The driver Worker plus whatever runs the other ranks. Engine-facing: load, size and allocate the cache,
    capture graphs, execute steps, close."""

    driver: Worker

    def load_model(self) -> None:
        self.driver.load_model()

    def determine_num_blocks(self, max_batch_size: int) -> int:
        return self.driver.determine_num_blocks(max_batch_size)

    def init_cache(self, num_blocks: int) -> None:
        self.driver.init_cache(num_blocks)

    def capture_graphs(self, max_batch_size: int, max_blocks: int) -> None:
        self.driver.capture_graphs(max_batch_size, max_blocks)

    def execute(self, sched: SchedulerOutput, sample_rows: list[int], patch=None) -> torch.Tensor | None:
        return self.driver.execute(sched, sample_rows, patch)

    def check_alive(self) -> None:
        """Raise if a rank has died."""

    def close(self, abort: bool = False) -> None:
        """Stop the other ranks; abort=True (start-up failed, the ranks may be out of step) does not wait long."""


class UniprocExecutor(Executor):
    def __init__(self, model_path: str | None, cfg: PytorchEngineConfig, device: torch.device):
        self.driver = Worker(model_path, cfg, device)


class _GroupExecutor(Executor):
    """Ranks 1..world-1 somewhere else, joined to this process (rank 0) in one torch.distributed group."""

    world_size: int

    def _join(self, device_type: str, init_method: str) -> None:
        self.device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
        self._num_threads = torch.get_num_threads()
        if device_type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(tp.cpu_threads_per_rank(self.world_size))
        tp.init_group(device_type, init_method, 0, self.world_size)
        self.channel = tp.Channel(self.device)
        self._closed = False
        atexit.register(self.close)  # a script that never closes its engine still stops the workers cleanly

    def _stop_ranks(self, abort: bool) -> None:
        raise NotImplementedError

    def _ranks_alive(self) -> bool:
        raise NotImplementedError

    def close(self, abort: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if not abort and self._ranks_alive():
            try:
                self.channel.send(tp.STOP)
            except Exception as e:  # a broken group: the workers are killed below
                logger.warning("could not tell the tensor-parallel workers to stop: %s", e)
        self._stop_ranks(abort)
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self._num_threads)


class MultiprocExecutor(_GroupExecutor):
    """Tensor parallelism on one host: the other ranks start now (spawned processes, each a Worker serving the
    channel) and load their shards while this one loads its own."""

    def __init__(self, model_path: str | None, cfg: PytorchEngineConfig, device_type: str):
        world = cfg.tp
        if device_type == "cuda" and torch.cuda.device_count() < world:
            raise ValueError(f"tp={world} needs {world} GPUs; this machine has {torch.cuda.device_count()}")
        self.world_size = world
        init_method = f"tcp://127.0.0.1:{tp.free_port()}"
        ctx = mp.get_context("spawn")
        self.procs = [
            ctx.Process(
                target=run_worker,
                args=(rank, world, init_method, device_type, model_path, cfg),
                name=f"lmforge-tp{rank}",
                daemon=True,
            )
            for rank in range(1, world)
        ]
        for p in self.procs:
            p.start()
        self._join(device_type, init_method)
        self.driver = Worker(model_path, cfg, self.device, 0, self.channel)

    def check_alive(self) -> None:
        dead = [p for p in self.procs if not p.is_alive()]
        if dead:
            raise RuntimeError(f"tensor-parallel worker {dead[0].name} exited with code {dead[0].exitcode}")

    def _ranks_alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def _stop_ranks(self, abort: bool) -> None:
        for p in self.procs:
            p.join(timeout=5 if abort else 30)
            if p.is_alive():
                p.kill()  # workers ignore SIGTERM (see worker.run_worker)
                p.join(timeout=5)
        logger.info("tensor-parallel workers stopped (exit codes %s)", [p.exitcode for p in self.procs])


def make_executor(model_path: str | None, cfg: PytorchEngineConfig, device_type: str) -> Executor:
    backend = getattr(cfg, "distributed_executor_backend", None) or "mp"
    if backend == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(model_path, cfg, device_type)
    if backend != "mp":
        raise ValueError(f"distributed_executor_backend must be 'mp' or 'ray', got {backend!r}")
    if cfg.tp > 1:
        return MultiprocExecutor(model_path, cfg, device_type)
    device = torch.device(device_type if device_type == "cpu" else f"cuda:{torch.cuda.current_device()}")
    return UniprocExecutor(model_path, cfg, device)
