"""Executors: where an Engine's Workers run. The Engine talks to one executor; each holds the driver Worker
(rank 0, in the Engine's process) and starts the other ranks, if any:

    UniprocExecutor      one rank, no process group
    MultiprocExecutor    tensor-parallel ranks 1..tp-1 as local processes (torch.multiprocessing, spawn)
    RayExecutor          the same ranks as Ray actors placed on a Ray cluster's nodes

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


class RayExecutor(_GroupExecutor):
    """Tensor-parallel ranks 1..tp-1 as Ray actors, placed by a placement group (one GPU, or one CPU, per rank)
    on the Ray cluster this process joins (RAY_ADDRESS, or a cluster started here with `ray start --head`; with
    none running, a local one that close() stops again). Each actor runs the same Worker as a local process would
    (worker.run_worker); rank 0 stays in this process and the group meets at this node's address."""

    def __init__(self, model_path: str | None, cfg: PytorchEngineConfig, device_type: str):
        try:
            import ray
            from ray.util.placement_group import placement_group, remove_placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        except ImportError:
            raise ValueError(
                "distributed_executor_backend='ray' needs Ray: pip install 'lmforge[ray]' (or ray)"
            ) from None
        self._ray, self._remove_pg = ray, remove_placement_group
        self._started_ray = False if ray.is_initialized() else join_ray()
        world = self.world_size = cfg.tp
        if device_type == "cuda" and torch.cuda.device_count() < 1:
            raise ValueError("distributed_executor_backend='ray' with CUDA needs a GPU for rank 0 on this node")
        bundle = {"GPU": 1} if device_type == "cuda" else {"CPU": 1}
        # an engine core that is itself a Ray actor (--dp on Ray) was placed in bundle 0 of a group made for all
        # its ranks, so that they land together; otherwise ranks 1.. get a group of their own
        from ray.util import get_current_placement_group

        current = get_current_placement_group()
        self._own_pg = current is None or len(current.bundle_specs) < world
        if self._own_pg:
            self.pg, first = placement_group([bundle] * (world - 1), strategy="PACK"), 0
        else:
            self.pg, first = current, 1
        try:
            ray.get(self.pg.ready(), timeout=120)
        except Exception:
            if self._own_pg:
                self._remove_pg(self.pg)
            raise RuntimeError(
                f"the Ray cluster has no room for {world - 1} more rank(s) of {bundle} (tp={world}): "
                f"its resources are {ray.cluster_resources()}"
            ) from None
        host = ray.util.get_node_ip_address()
        init_method = f"tcp://{host}:{tp.free_port('0.0.0.0')}"
        actor_cls = ray.remote(_RayRank)
        self.actors, self.refs = [], []
        for rank in range(1, world):
            actor = actor_cls.options(
                num_cpus=bundle.get("CPU", 0),
                num_gpus=bundle.get("GPU", 0),
                name=None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=first + rank - 1
                ),
            ).remote()
            # a Ray GPU actor sees only its own GPU, as cuda:0
            dev_index = 0 if device_type == "cuda" else None
            self.actors.append(actor)
            self.refs.append(actor.run.remote(rank, world, init_method, device_type, model_path, cfg, dev_index))
        self._join(device_type, init_method)
        self.driver = Worker(model_path, cfg, self.device, 0, self.channel)

    def check_alive(self) -> None:
        done, _ = self._ray.wait(self.refs, timeout=0)
        if done:
            self._ray.get(done[0])  # raises the rank's error
            raise RuntimeError("a tensor-parallel Ray actor stopped early")

    def _ranks_alive(self) -> bool:
        done, _ = self._ray.wait(self.refs, timeout=0)
        return not done

    def _stop_ranks(self, abort: bool) -> None:
        ray = self._ray
        try:
            ray.get(self.refs, timeout=5 if abort else 30)
        except Exception as e:
            logger.warning("tensor-parallel Ray actors did not stop cleanly: %s", e)
        for actor in self.actors:
            ray.kill(actor)
        if self._own_pg:
            self._remove_pg(self.pg)
        logger.info("tensor-parallel Ray actors stopped")
        if self._started_ray:
            ray.shutdown()


def join_ray() -> bool:
    """Join the Ray cluster named by RAY_ADDRESS, or the one `ray start --head` recorded on this node if its GCS
    answers, or else start a local one; True when this process started it (and so should stop it)."""
    import os
    import socket

    import ray

    address = os.environ.get("RAY_ADDRESS")
    if not address:
        try:  # where `ray start` writes the address of the cluster it started; stale after a crash or a kill
            with open(os.path.join(os.environ.get("RAY_TMPDIR", "/tmp/ray"), "ray_current_cluster")) as f:
                recorded = f.read().strip()
            host, _, port = recorded.rpartition(":")
            with socket.create_connection((host, int(port)), timeout=2):
                address = recorded
        except (OSError, ValueError):
            address = None
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    logger.info("no Ray cluster is running: starting a local one")
    ray.init(include_dashboard=False, log_to_driver=False)
    return True


class _RayRank:
    """A Ray actor running one rank > 0 (the class is made remote when Ray is first used)."""

    def run(self, rank, world, init_method, device_type, model_path, cfg, device_index) -> int:
        run_worker(rank, world, init_method, device_type, model_path, cfg, device_index)
        return 0


def make_executor(model_path: str | None, cfg: PytorchEngineConfig, device_type: str) -> Executor:
    backend = cfg.distributed_executor_backend or "mp"
    if backend == "ray" and cfg.tp > 1:
        return RayExecutor(model_path, cfg, device_type)
    if backend not in ("mp", "ray"):
        raise ValueError(f"distributed_executor_backend must be 'mp' or 'ray', got {backend!r}")
    if cfg.tp > 1:  # one rank needs no placement: it runs here, whichever backend
        return MultiprocExecutor(model_path, cfg, device_type)
    device = torch.device(device_type if device_type == "cpu" else f"cuda:{torch.cuda.current_device()}")
    return UniprocExecutor(model_path, cfg, device)
