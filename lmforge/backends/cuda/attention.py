"""Paged attention on the Triton kernels: split-K decode when every sequence brings one query token,
variable-length prefill over the paged cache otherwise (prefill, chunked prefill, mixed batches)."""

from __future__ import annotations

import torch

from lmforge.kernels.cuda.decode_attention import decode_attention
from lmforge.kernels.cuda.fill_kv_cache import fill_kv_cache as fill_kernel
from lmforge.kernels.cuda.prefill_attention import prefill_attention
from lmforge.model_inputs import AttnMetadata


def fill_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value [num_tokens, kv_heads, dim] into the slots named by slot_mapping."""
    fill_kernel(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    attn_metadata: AttnMetadata,
    scale: float,
    sliding_window: int | None = None,
    logit_softcapping: float | None = None,
    v_head_dim: int | None = None,
) -> torch.Tensor:
    """query [num_tokens, heads, dim] -> [num_tokens, heads, v_dim]; the cache already holds this step's keys."""
    meta = attn_metadata
    # a shape test, not a data test, so the choice is fixed when a decode step is captured in a CUDA graph
    if meta.is_decoding and query.shape[0] == meta.num_seqs:
        return decode_attention(
            query,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.kv_seqlens,
            scale,
            sliding_window,
            logit_softcapping,
            v_head_dim,
        )
    return prefill_attention(
        query,
        k_cache,
        v_cache,
        meta.block_tables,
        meta.q_start_loc,
        meta.q_seqlens,
        meta.kv_seqlens,
        meta.max_q_seqlen,
        scale,
        sliding_window,
        logit_softcapping,
        v_head_dim,
    )
