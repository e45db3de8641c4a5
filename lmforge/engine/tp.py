"""Tensor parallelism: one process per rank, over torch.distributed (gloo on CPU, NCCL on CUDA).

Rank 0 is the Engine: it schedules, samples, and broadcasts each step's packed inputs (the two arrays the
ModelRunner builds anyway). Ranks 1..tp-1 run `_worker_main`: the same model built with their shard of every
parallel weight and of the KV heads, driven only by rank 0's broadcasts. Row-parallel linears all-reduce inside
the forward, so every rank ends a step with the same hidden states; only rank 0 computes logits.

The protocol is a fixed-size int64 header per message (a command and its arguments), then the step's data:
    STEP    the header carries the pack sizes; the int64 and int32 packs follow
    PROFILE a memory profile step on a temporary cache of N blocks follows (CUDA); peaks are max-reduced
    SIZE    each rank sizes its KV cache from its own free memory; the counts are min-reduced
    ALLOC   allocate the KV cache with N blocks
    STOP    leave the loop and exit
Steps run eagerly (no CUDA graphs) and without step overlap when tp > 1.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import signal
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

logger = logging.getLogger(__name__)

STEP, PROFILE, SIZE, ALLOC, STOP = range(5)
HEADER_LEN = 12
# a collective that waits longer than this (a rank died, or a step far beyond anything sane) raises instead of
# hanging the server forever
TIMEOUT = datetime.timedelta(minutes=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_threads_per_rank(world: int) -> int:
    """CPU ranks share the machine's cores instead of each starting one thread per core."""
    return max(1, torch.get_num_threads() // world)


class Channel:
    """Rank 0's and the workers' end of the broadcasts."""

    def __init__(self, device: torch.device):
        self.device = device
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()

    def send(self, cmd: int, *args: int) -> None:
        header = torch.zeros(HEADER_LEN, dtype=torch.int64, device=self.device)
        header[0] = cmd
        header[1 : 1 + len(args)] = torch.tensor(args, dtype=torch.int64)
        dist.broadcast(header, src=0)

    def recv(self) -> list[int]:
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        dist.broadcast(header, src=0)
        return header.tolist()

    def broadcast(self, tensor: torch.Tensor) -> None:
        if tensor.numel():
            dist.broadcast(tensor, src=0)

    def reduce_int(self, value: int, op) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=op)
        return int(t.item())


class TensorParallel:
    """Started by the Engine (rank 0): spawns the workers, joins the process group, and stops them on close."""

    def __init__(self, world_size: int, device_type: str, model_path: str | None, engine_config):
        if device_type == "cuda" and torch.cuda.device_count() < world_size:
            raise ValueError(f"tp={world_size} needs {world_size} GPUs; this machine has {torch.cuda.device_count()}")
        self.world_size = world_size
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")
        self.procs = [
            ctx.Process(
                target=_worker_main,
                args=(rank, world_size, init_method, device_type, model_path, engine_config),
                name=f"lmforge-tp{rank}",
                daemon=True,
            )
            for rank in range(1, world_size)
        ]
        for p in self.procs:
            p.start()
        self.device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
        self._num_threads = torch.get_num_threads()
        if device_type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(cpu_threads_per_rank(world_size))
        dist.init_process_group(
            "nccl" if device_type == "cuda" else "gloo",
            init_method=init_method,
            rank=0,
            world_size=world_size,
            timeout=TIMEOUT,
        )
        self.channel = Channel(self.device)
        self._closed = False
        atexit.register(self.close)  # a script that never closes its engine still stops the workers cleanly

    def check_alive(self) -> None:
        dead = [p for p in self.procs if not p.is_alive()]
        if dead:
            raise RuntimeError(f"tensor-parallel worker {dead[0].name} exited with code {dead[0].exitcode}")

    def close(self, abort: bool = False) -> None:
        """Tell the workers to stop and wait for them; abort=True (start-up failed, the ranks may be out of
        step) only waits briefly and then terminates them."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if not abort and all(p.is_alive() for p in self.procs):
            try:
                self.channel.send(STOP)
            except Exception as e:  # a broken group: the workers are terminated below
                logger.warning("could not tell the tensor-parallel workers to stop: %s", e)
        for p in self.procs:
            p.join(timeout=5 if abort else 30)
            if p.is_alive():
                p.kill()  # workers ignore SIGTERM (see _worker_main)
                p.join(timeout=5)
        logger.info("tensor-parallel workers stopped (exit codes %s)", [p.exitcode for p in self.procs])
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self._num_threads)


def _worker_main(rank: int, world: int, init_method: str, device_type: str, model_path, cfg) -> None:
    """A rank > 0: build the shard, then follow rank 0's commands until STOP.

    Ctrl-C and SIGTERM reach the whole process group; only rank 0 acts on them (it finishes or aborts its
    requests, then sends STOP), since a worker that left mid-step would stall the other ranks' collectives."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from lmforge.engine import cache_engine as ce
    from lmforge.engine.model_loader import build_model
    from lmforge.engine.model_runner import ModelRunner
    from lmforge.engine.startup import resolve_dtype
    from lmforge.model_inputs import StepContextManager
    from lmforge.model_source import load_model_source

    if device_type == "cpu":
        from lmforge.engine.host_memory import bound_cpu_kernel_caches

        bound_cpu_kernel_caches()
        torch.set_num_threads(cpu_threads_per_rank(world))
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=TIMEOUT,
    )
    channel = Channel(device)
    source = load_model_source(model_path, cfg.trust_remote_code, False, cfg.custom_module_map)
    dtype = resolve_dtype(cfg.dtype, source.hf_config, device_type)
    source.model_config.dtype = dtype
    ctx_mgr = StepContextManager()
    model = build_model(
        source, dtype, device, ctx_mgr, cfg.custom_module_map, rank, world, None, check_weights=cfg.check_weights
    )
    runner = None
    with torch.inference_mode():
        while True:
            cmd, *args = channel.recv()
            if cmd == STOP:
                break
            if cmd == STEP:
                runner.follow(args)
            elif cmd == PROFILE:
                from lmforge.engine.profile import follow_profile

                follow_profile(model, ctx_mgr, source.model_config, cfg.block_size, dtype, device, channel, args[0])
            elif cmd == SIZE:
                blocks = ce.num_gpu_blocks(
                    source.model_config,
                    ce.CacheConfig(
                        block_size=cfg.block_size,
                        cache_max_entry_count=cfg.cache_max_entry_count,
                        quant_policy=cfg.quant_policy,
                        kv_cache_dtype=cfg.kv_cache_dtype,
                    ),
                    dtype,
                    device,
                    args[0],
                    tp_size=world,
                )
                channel.reduce_int(blocks, dist.ReduceOp.MIN)
            elif cmd == ALLOC:
                cache = ce.CacheEngine(
                    source.model_config,
                    args[0],
                    cfg.block_size,
                    dtype,
                    device,
                    tp_size=world,
                    quant_policy=cfg.quant_policy,
                    kv_cache_dtype=cfg.kv_cache_dtype,
                )
                runner = ModelRunner(model, ctx_mgr, cache.kv_caches, cfg.block_size, device, channel=channel)
    dist.destroy_process_group()
