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


@dataclass(frozen=True, slots=True)
class AttnOptions:
    """The attention variant of one layer, fixed when the model is built and passed from nn to the backend op to
    the kernel launcher. v_head_dim reads the first v_head_dim channels of the value cache (MLA shares one latent
    cache for keys and values)."""

    scale: float
    sliding_window: int | None = None
    logit_softcapping: float | None = None
    v_head_dim: int | None = None


@dataclass(frozen=True, slots=True)
class QuantizedCache:
    """One layer's key (or value) cache stored as integers, lmdeploy's `quant_policy` 8 / 4: every (token, head)
    row of head_dim values x has its own asymmetric scale and zero point,
    scale = (max(x) - min(x)) / (2**bits - 1), zero = -min(x) / scale, q = round(x / scale + zero),
    and reads back as (q - zero) * scale. int4 packs channels 2i (low nibble) and 2i + 1 (high nibble) into byte i.

    The engine's CacheEngine allocates it; model files pass it through untouched as their k_cache / v_cache, and
    the backend ops write and read it (the format travels with the cache, so it cannot disagree with it)."""

    data: torch.Tensor  # [num_blocks, block_size, kv_heads, head_dim * bits // 8] uint8
    scales_zeros: torch.Tensor  # [num_blocks, block_size, kv_heads, 2] float32: (scale, zero point)
    bits: int

    @property
    def head_dim(self) -> int:
        return self.data.shape[-1] * 8 // self.bits

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The logical [num_blocks, block_size, kv_heads, head_dim], as a plain cache tensor would have it."""
        return (*self.data.shape[:3], self.head_dim)


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
    # per layer: (key, value), each [num_blocks, block_size, heads, dim], or a QuantizedCache each (quant_policy 4/8)
    kv_caches: list[tuple[torch.Tensor | QuantizedCache, ...]]
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
