"""Tensor parallelism: the process group and the channel over which rank 0 drives the other ranks.

Rank 0 is the Engine's own Worker: it schedules, samples, and broadcasts each step's packed inputs (the two arrays
the ModelRunner builds anyway). Ranks 1..tp-1 are Workers serving this channel (`Worker.serve`): the same model
built with their shard of every parallel weight and of the KV heads, driven only by rank 0's broadcasts.
Row-parallel linears all-reduce inside the forward, so every rank ends a step with the same hidden states; only
rank 0 computes logits. Where the ranks run (local processes, Ray actors) is the executor's business
(engine/executor.py); this module knows only torch.distributed.

The protocol is a fixed-size int64 header per message (a command and its arguments), then the step's data:
    STEP    the header carries the pack sizes; the int64 and int32 packs follow
    PROFILE a memory profile step on a temporary cache of N blocks follows (CUDA); peaks are max-reduced
    SIZE    each rank sizes its KV cache from its own free memory; the counts are min-reduced
    ALLOC   allocate the KV cache with N blocks
    GRAPHS  capture CUDA graphs for decode batches up to N sequences and M blocks per sequence
    STOP    leave the loop and exit
Steps run without step overlap when tp > 1 (rank 0 waits for each step's tokens before the next broadcast).
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist

STEP, PROFILE, SIZE, ALLOC, GRAPHS, STOP = range(6)
HEADER_LEN = 12
# a collective that waits longer than this (a rank died, or a step far beyond anything sane) raises instead of
# hanging the server forever
TIMEOUT = datetime.timedelta(minutes=10)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cpu_threads_per_rank(world: int) -> int:
    """CPU ranks share the machine's cores instead of each starting one thread per core."""
    return max(1, torch.get_num_threads() // world)


def init_group(device_type: str, init_method: str, rank: int, world: int) -> None:
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=TIMEOUT,
    )


class Channel:
    """Rank 0's and the other ranks' end of the broadcasts."""

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

    def send_step(self, sizes: tuple[int, ...], flat64: torch.Tensor, flat32: torch.Tensor) -> None:
        """Rank 0: a step's pack sizes, then its two packs."""
        self.send(STEP, *sizes)
        self.broadcast(flat64)
        self.broadcast(flat32)

    def broadcast(self, tensor: torch.Tensor) -> None:
        if tensor.numel():
            dist.broadcast(tensor, src=0)

    def reduce_int(self, value: int, op) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=op)
        return int(t.item())
