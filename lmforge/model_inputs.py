"""The per-step batch a model sees: StepContext, its attention metadata, and the manager
through which a model reads it. The ModelRunner builds one StepContext per forward.

Tokens of all sequences are flattened into one dimension (no padding): sequence i owns
rows q_start_loc[i] : q_start_loc[i] + q_seqlens[i] of input_ids / position_ids / hidden states.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class AttnMetadata:
    """Where each sequence's keys and values live in the paged cache.

    kv_seqlens counts every key of the sequence after this step's tokens are written, so the
    first new token of sequence i sits at position kv_seqlens[i] - q_seqlens[i].
    """

    is_decoding: bool
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    q_start_loc: torch.Tensor  # [num_seqs] int32
    q_seqlens: torch.Tensor  # [num_seqs] int32
    kv_seqlens: torch.Tensor  # [num_seqs] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset of each new token
    max_q_seqlen: int
    max_kv_seqlen: int
    block_size: int
    # host copies, so CPU-side code never syncs with the device to read them
    q_seqlens_list: list[int] = field(default_factory=list)
    kv_seqlens_list: list[int] = field(default_factory=list)
    # per-step scratch a backend may fill once and reuse in every layer (masks, gather indices)
    scratch: dict = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return self.q_seqlens.numel()


@dataclass(slots=True)
class StepContext:
    """Everything one forward needs. Built by engine.model_runner, read by models via ctx_mgr."""

    input_ids: torch.Tensor  # [num_tokens]
    position_ids: torch.Tensor  # [num_tokens]
    attn_metadata: AttnMetadata
    kv_caches: list[tuple[torch.Tensor, ...]]  # per layer: (key, value), each [num_blocks, block_size, heads, dim]
    is_decoding: bool
    last_token_indices: torch.Tensor  # [num_seqs] row of each sequence's last token in the flat batch
    inputs_embeds: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def q_seqlens(self) -> torch.Tensor:
        return self.attn_metadata.q_seqlens

    @property
    def kv_seqlens(self) -> torch.Tensor:
        return self.attn_metadata.kv_seqlens

    @property
    def block_offsets(self) -> torch.Tensor:
        return self.attn_metadata.block_tables


class StepContextManager:
    """Holds the context of the step in flight; the model runner sets it around each forward."""

    def __init__(self) -> None:
        self._context: StepContext | None = None

    def current_context(self) -> StepContext:
        if self._context is None:
            raise RuntimeError("no step in flight: StepContext is only available inside a model forward")
        return self._context

    @contextmanager
    def context(self, ctx: StepContext) -> Iterator[StepContext]:
        prev, self._context = self._context, ctx
        try:
            yield ctx
        finally:
            self._context = prev
