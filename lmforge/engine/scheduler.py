"""Scheduler: decides which sequences run in the next step and how many of their tokens.

Every sequence has known tokens (prompt + generated) and computed tokens (in the KV cache);
a step lets computed catch up with known. Running sequences go first (one token each when
decoding, the next chunk when still prefilling); waiting ones are admitted FIFO while the
prefill token budget, free blocks and max_batch_size allow. When a running sequence cannot
get a block, the newest running sequence is preempted: its blocks are freed and it waits to
be recomputed. Pure Python, no torch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lmforge.config import SchedulerConfig

from .block_manager import BlockManager
from .sequence import SeqStatus, Sequence


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens each sequence computes this step
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def is_decoding(self) -> bool:
        return all(n == 1 for n in self.num_tokens)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # total, for metrics

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_prefill_token_num
        bm = self.block_manager
        # running sequences, oldest first; the newest are preempted when blocks run out
        for seq in list(self.running):
            # preempted in this loop (a status test: `in self.running` would make the loop quadratic), or finishing
            if seq.status is not SeqStatus.RUNNING or seq.is_draining:
                continue
            pending = seq.num_pending_tokens
            num = pending if pending == 1 else min(pending, budget)
            if num <= 0:
                continue
            total = seq.num_computed_tokens + num
            if total > len(seq.block_ids) * bm.block_size:  # most decode steps fit in the last block
                while not bm.can_allocate(seq, total):
                    victim = self.running[-1]
                    self._preempt(victim, out)
                    if victim is seq:
                        break
                if seq.status is not SeqStatus.RUNNING:
                    continue
                bm.allocate(seq, total)
            out.seqs.append(seq)
            out.num_tokens.append(num)
            if num > 1:
                budget -= num
        # admit waiting sequences while budget, blocks and batch size allow
        while self.waiting and budget > 0 and len(out.seqs) < self.config.max_batch_size:
            seq = self.waiting[0]
            bm.match_prefix(seq)
            pending = seq.num_pending_tokens
            num = min(pending, budget) if self.config.enable_chunked_prefill else pending
            if num > budget and out.seqs:
                break
            if not bm.can_allocate(seq, seq.num_computed_tokens + num):
                bm.free(seq)  # give back the prefix-cache blocks it matched; it retries next step
                seq.num_computed_tokens = 0
                break
            bm.allocate(seq, seq.num_computed_tokens + num)
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_tokens.append(num)
            budget -= num
        return out

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished or aborted) from whichever queue holds it and free its blocks."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        self.block_manager.free(seq)
