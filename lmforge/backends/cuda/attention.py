"""Paged attention on the Triton kernels: split-K decode when every sequence brings one query token,
variable-length prefill over the paged cache otherwise (prefill, chunked prefill, mixed batches).
A QuantizedCache (quant_policy 8/4) is unpacked here into its codes and scales for the kernels.
A decode step over a plain cache writes its keys/values in the attention kernel itself (fill_kv_and_attend)."""

from __future__ import annotations

import torch

from lmforge.kernels.cuda.decode_attention import decode_attention, fusable_fill
from lmforge.kernels.cuda.fill_kv_cache import fill_kv_cache as fill_kernel
from lmforge.kernels.cuda.prefill_attention import prefill_attention
from lmforge.model_inputs import AttnMetadata, AttnOptions, QuantizedCache


def _quant_kwargs(k_cache: torch.Tensor | QuantizedCache, v_cache: torch.Tensor | QuantizedCache | None) -> dict:
    if not isinstance(k_cache, QuantizedCache):
        return {}
    v_scales_zeros = v_cache.scales_zeros if isinstance(v_cache, QuantizedCache) else None
    return {"k_scales_zeros": k_cache.scales_zeros, "v_scales_zeros": v_scales_zeros, "quant_bits": k_cache.bits}


def _data(cache: torch.Tensor | QuantizedCache | None) -> torch.Tensor | None:
    return cache.data if isinstance(cache, QuantizedCache) else cache


def fill_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor | None,
    k_cache: torch.Tensor | QuantizedCache,
    v_cache: torch.Tensor | QuantizedCache | None,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value [num_tokens, kv_heads, dim] into the slots named by slot_mapping."""
    fill_kernel(key, value, _data(k_cache), _data(v_cache), slot_mapping, **_quant_kwargs(k_cache, v_cache))


# benchmarks switch it off to time the separate fill kernel; read at call time, so before a graph is captured
FUSED_FILL_ENABLED = True


def _is_decode(query: torch.Tensor, meta: AttnMetadata) -> bool:
    # a shape test, not a data test, so the choice is fixed when a decode step is captured in a CUDA graph
    return meta.is_decoding and query.shape[0] == meta.num_seqs


def fill_kv_and_attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor | None,
    k_cache: torch.Tensor | QuantizedCache,
    v_cache: torch.Tensor | QuantizedCache | None,
    attn_metadata: AttnMetadata,
    options: AttnOptions,
) -> torch.Tensor:
    """fill_kv_cache then paged_attention, in one decode kernel where the cache format allows it."""
    meta, opt = attn_metadata, options
    if (
        FUSED_FILL_ENABLED
        and _is_decode(query, meta)
        and not isinstance(k_cache, QuantizedCache)
        and not isinstance(v_cache, QuantizedCache)
        and fusable_fill(key, value, k_cache, v_cache)
        and (opt.v_head_dim or v_cache.shape[-1]) == v_cache.shape[-1]
    ):
        return decode_attention(
            query,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.kv_seqlens,
            opt.scale,
            opt.sliding_window,
            opt.logit_softcapping,
            opt.v_head_dim,
            key=key,
            value=value,
            slot_mapping=meta.slot_mapping,
        )
    fill_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping)
    return paged_attention(query, k_cache, v_cache, meta, opt)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor | QuantizedCache,
    v_cache: torch.Tensor | QuantizedCache,
    attn_metadata: AttnMetadata,
    options: AttnOptions,
) -> torch.Tensor:
    """query [num_tokens, heads, dim] -> [num_tokens, heads, v_dim]; the cache already holds this step's keys."""
    meta, opt = attn_metadata, options
    quant = _quant_kwargs(k_cache, v_cache)
    k_cache, v_cache = _data(k_cache), _data(v_cache)
    if _is_decode(query, meta):
        return decode_attention(
            query,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.kv_seqlens,
            opt.scale,
            opt.sliding_window,
            opt.logit_softcapping,
            opt.v_head_dim,
            **quant,
        )
    d, rest_q_start = _decode_prefix(meta)
    out = None
    if d:  # a mixed batch: its leading decode rows take the decode kernel, one program per GQA group
        part = decode_attention(
            query[:d],
            k_cache,
            v_cache,
            meta.block_tables[:d],
            meta.kv_seqlens[:d],
            opt.scale,
            opt.sliding_window,
            opt.logit_softcapping,
            opt.v_head_dim,
            **quant,
        )
        out = part.new_empty((query.shape[0], *part.shape[1:]))
        out[:d].copy_(part)
    rest = prefill_attention(
        query[d:],
        k_cache,
        v_cache,
        meta.block_tables[d:],
        rest_q_start if d else meta.q_start_loc,
        meta.q_seqlens[d:],
        meta.kv_seqlens[d:],
        meta.max_q_seqlen,
        opt.scale,
        opt.sliding_window,
        opt.logit_softcapping,
        opt.v_head_dim,
        out=None if out is None else out[d:],
        **quant,
    )
    return rest if out is None else out


# decode rows a mixed batch needs at its head before they leave the prefill kernel
MIN_DECODE_PREFIX = 8


def _decode_prefix(meta: AttnMetadata) -> tuple[int, torch.Tensor | None]:
    """(d, q_start_loc of the rows after d): the first d rows of a mixed batch bring one query each (running
    sequences come first in a step, prefill chunks after them). The prefill kernel would give such a row one
    program per query head, each reading the keys again; the decode kernel reads them once per KV head. d is 0
    when too few rows qualify (or none are left for the prefill kernel). Computed once per step (scratch)."""
    split = meta.scratch.get("decode_prefix")
    if split is None:
        q_lens = meta.q_seqlens_list
        d = 0
        while d < len(q_lens) and q_lens[d] == 1:
            d += 1
        # a multiple of 4 rows: the int32 slices handed to the prefill kernel then start 16-byte aligned, as the
        # whole tensors do (Triton compiles a variant per pointer alignment: seconds, mid-run)
        d -= d % 4
        split = (d, meta.q_start_loc[d:] - d) if MIN_DECODE_PREFIX <= d < len(q_lens) else (0, None)
        meta.scratch["decode_prefix"] = split
    return split
