"""Sequence: one generation stream's tokens, cache blocks and progress. The scheduler moves it
between queues; the engine appends sampled tokens; the block manager owns its block_ids."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.messages import GenerationConfig

# token_ids entry of a token sampled by a step still in flight; replaced once the step is read
PLACEHOLDER = -1


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    gen_config: GenerationConfig
    stop_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    guide: Any = None
    detokenizer: Any = None
    # the sampler's per-request parameters and feature bits (sampler.RowInfo), computed once by the engine
    sampling: Any = None
    status: SeqStatus = SeqStatus.WAITING
    # tokens whose keys/values are in the cache; the step computes token_ids[num_computed_tokens:]
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    # number of leading blocks registered in the prefix cache (full and hashed)
    num_hashed_blocks: int = 0
    finish_reason: str | None = None
    error: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    num_preemptions: int = 0
    # row of this sequence's token in the sampled tensor of the step in flight (see PLACEHOLDER)
    inflight_row: int | None = None
    # its length limit is reached by a token in flight: schedule no further step
    is_draining: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_pending_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
