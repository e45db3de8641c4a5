"""Decode attention over the paged KV cache (one query token per sequence), flash-decoding style.

Decode is memory-bound: the floor is reading each sequence's K and V once. So one program serves all
query heads that share a KV head (GQA), and each sequence's keys are split into up to `num_splits` slices
handled by separate programs, whose partial results (output normalised per slice, plus its log-sum-exp) are
combined by the last program of the sequence to finish (an arrival counter; or, with fused_reduce=False, by a
second kernel). A slice reads at least MIN_SPLIT_KEYS keys when the grid fills the GPU anyway, so a short sequence
needs fewer partials; a grid of fewer programs than half the SMs (batch-1 decode) splits down to
SMALL_GRID_MIN_SPLIT_KEYS. Given this step's key/value (and their
slots), the kernel also writes them into the cache and attends to them from registers: the decode step's
fill_kv_cache launch is gone.

CUDA-graph safe: the grid depends only on shapes (num_splits comes from the block table's width, never
from kv lengths). Each program reads its sequence's kv length on the device, cuts the visible key range
into runs of BLOCK_N-key chunks, and returns at once when its run is empty.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import (
    LOG2E,
    NEG_BIG,
    attn_scores,
    attn_values,
    check_out,
    dot_precision,
    kv_quant_args,
    quantized_query,
    shares_kv,
    split_head_dim,
    stable_cache_keys,
    tanh,
)
from .quant_common import NUM_LOCKS, splitk_locks


@triton.jit
def _split_range(
    kv_len, window, split, num_splits, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr, MIN_CHUNKS: tl.constexpr
):
    """Chunks [start, end) of BLOCK_N keys that this split covers, the first visible key, and how many splits have
    keys at all. A split takes at least MIN_CHUNKS chunks: a short sequence uses fewer splits than the grid has
    (fewer partials to combine), and one that fits in a single split needs no combine."""
    lo = 0
    if WINDOW:  # the query sits at kv_len - 1; key j is visible iff kv_len - 1 - j < window
        lo = tl.maximum(kv_len - window, 0)
    first = lo // BLOCK_N
    num_chunks = tl.cdiv(kv_len, BLOCK_N) - first
    per_split = tl.maximum(tl.cdiv(num_chunks, num_splits), MIN_CHUNKS)
    start = first + split * per_split
    end = tl.minimum(start + per_split, first + num_chunks)
    return lo, start, end, tl.cdiv(num_chunks, per_split)


# split count and block-table width vary with the batch: no variant per value
@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_sz_ptr,
    v_sz_ptr,
    block_tables_ptr,
    kv_seqlens_ptr,
    part_out_ptr,
    part_lse_ptr,
    new_k_ptr,
    new_v_ptr,
    slot_ptr,
    out_ptr,
    lock_ptr,
    scale,
    softcap,
    window,
    num_heads,
    group_size,
    head_dim,
    v_dim,
    block_size,
    num_splits,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_zb,
    stride_zs,
    stride_zh,
    stride_bt,
    stride_nkt,
    stride_nkh,
    stride_nkd,
    stride_nvt,
    stride_nvh,
    stride_nvd,
    stride_ot,
    stride_oh,
    stride_od,
    SOFTCAP: tl.constexpr,
    WINDOW: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    SHARED_KV: tl.constexpr,
    QUANT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FUSED_FILL: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
    MIN_CHUNKS: tl.constexpr,
):
    seq = tl.program_id(0)
    # a large group (MLA: 16-128 query heads on one latent head) is served BLOCK_G heads per program
    head_blocks = tl.cdiv(group_size, BLOCK_G)
    kv_head = tl.program_id(1) // head_blocks
    split = tl.program_id(2)
    kv_len = tl.load(kv_seqlens_ptr + seq)
    lo, start, end, num_active = _split_range(kv_len, window, split, num_splits, WINDOW, BLOCK_N, MIN_CHUNKS)
    g = (tl.program_id(1) % head_blocks) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_mask = g < group_size
    heads = kv_head * group_size + g
    # head channels [0, BLOCK_D1) always exist (BLOCK_D1 <= head_dim); [BLOCK_D1, head_dim) is the masked tail
    d1 = tl.arange(0, BLOCK_D1)
    dv = tl.arange(0, BLOCK_DV)
    out_mask = g_mask[:, None] & (dv[None, :] < v_dim)
    if start >= end:
        if FUSED_REDUCE:  # a row with no keys at all (kv_len 0) gets zeros, as the reduce kernel gives it
            if (split == 0) & (kv_len <= lo):
                zeros = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
                tl.store(
                    out_ptr + seq * stride_ot + heads[:, None] * stride_oh + dv[None, :] * stride_od,
                    zeros.to(out_ptr.dtype.element_ty),
                    mask=out_mask,
                )
        return

    q_rows = q_ptr + seq * stride_qt + heads[:, None] * stride_qh
    q1 = tl.load(q_rows + d1[None, :] * stride_qd, mask=g_mask[:, None], other=0.0)
    if BLOCK_D2 > 0:
        d2 = BLOCK_D1 + tl.arange(0, BLOCK_D2)
        q2 = tl.load(q_rows + d2[None, :] * stride_qd, mask=g_mask[:, None] & (d2[None, :] < head_dim), other=0.0)
    else:  # placeholders, never read
        d2 = d1
        q2 = q1
    # quantized keys are scored against a float16 copy of the query (common.attn_scores)
    qk1, qk2, q_sum, q_scale = q1, q2, tl.zeros([BLOCK_G], tl.float32), tl.full([BLOCK_G], 1.0, tl.float32)
    if QUANT != 0:
        qk1, qk2, q_sum, q_scale = quantized_query(q1, q2, BLOCK_D2)
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh
    k_sz_head = k_sz_ptr + kv_head * stride_zh
    v_sz_head = v_sz_ptr + kv_head * stride_zh
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt

    # FUSED_FILL: this step's key and value are not in the cache yet; the program whose run holds the last key
    # writes them there and takes them from registers, so the cached keys end one short
    cached_len = kv_len - 1 if FUSED_FILL else kv_len
    m_i = tl.full([BLOCK_G], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    for chunk in range(start, end):
        j = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
        j_mask = (j >= lo) & (j < cached_len)
        block_id = tl.load(table + j // block_size, mask=j_mask, other=0).to(tl.int64)
        offset = j % block_size
        k_row = block_id * stride_kb + offset * stride_ks
        sz_row = block_id * stride_zb + offset * stride_zs
        s, k1 = attn_scores(
            qk1,
            qk2,
            q_sum,
            q_scale,
            k_head,
            k_sz_head,
            k_row,
            sz_row,
            j_mask,
            head_dim,
            stride_kd,
            BLOCK_N,
            BLOCK_D1,
            BLOCK_D2,
            QUANT,
            True,
            DOT_PRECISION,
        )  # [BLOCK_G, BLOCK_N]
        if SOFTCAP:
            s = softcap * tanh(s * (scale / softcap)) * LOG2E
        else:
            s = s * (scale * LOG2E)
        s = tl.where(j_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if SHARED_KV:  # the values are the key tile's leading channels: no second load
            acc = tl.dot(p.to(q1.dtype), k1.to(q1.dtype), acc, input_precision=DOT_PRECISION)
        else:
            v_row = block_id * stride_vb + offset * stride_vs
            acc = attn_values(
                acc,
                p,
                q1,
                v_head,
                v_sz_head,
                v_row,
                sz_row,
                j_mask,
                v_dim,
                stride_vd,
                BLOCK_N,
                BLOCK_DV,
                QUANT,
                True,
                DOT_PRECISION,
            )
        m_i = m_new

    if FUSED_FILL:
        last_chunk = (kv_len - 1) // BLOCK_N
        if (last_chunk >= start) & (last_chunk < end):
            slot = tl.load(slot_ptr + seq)
            k_dst = k_head + (slot // block_size) * stride_kb + (slot % block_size) * stride_ks
            v_dst = v_head + (slot // block_size) * stride_vb + (slot % block_size) * stride_vs
            new_k = new_k_ptr + seq * stride_nkt + kv_head * stride_nkh
            k_new1 = tl.load(new_k + d1 * stride_nkd)
            tl.store(k_dst + d1 * stride_kd, k_new1)
            s_new = tl.sum(q1.to(tl.float32) * k_new1.to(tl.float32)[None, :], axis=1)
            if BLOCK_D2 > 0:
                k_new2 = tl.load(new_k + d2 * stride_nkd, mask=d2 < head_dim, other=0.0)
                tl.store(k_dst + d2 * stride_kd, k_new2, mask=d2 < head_dim)
                s_new += tl.sum(q2.to(tl.float32) * k_new2.to(tl.float32)[None, :], axis=1)
            v_new = tl.load(new_v_ptr + seq * stride_nvt + kv_head * stride_nvh + dv * stride_nvd, mask=dv < v_dim)
            tl.store(v_dst + dv * stride_vd, v_new, mask=dv < v_dim)
            if SOFTCAP:
                s_new = softcap * tanh(s_new * (scale / softcap)) * LOG2E
            else:
                s_new = s_new * (scale * LOG2E)
            m_new = tl.maximum(m_i, s_new)
            p_new = tl.exp2(s_new - m_new)
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + p_new
            acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
            m_i = m_new

    # partials: out [seqs, heads, splits, BLOCK_DV], lse [seqs, heads, splits] (log2 domain)
    part = (seq * num_heads + heads) * num_splits + split
    if FUSED_REDUCE:
        if num_active == 1:  # the whole sequence in this program: the result itself, no partial
            res = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(
                out_ptr + seq * stride_ot + heads[:, None] * stride_oh + dv[None, :] * stride_od,
                res.to(out_ptr.dtype.element_ty),
                mask=out_mask,
            )
        else:
            tl.store(
                part_out_ptr + part[:, None].to(tl.int64) * BLOCK_DV + dv[None, :], acc / l_i[:, None], mask=out_mask
            )
            tl.store(part_lse_ptr + part, m_i + tl.log2(l_i), mask=g_mask)
            # the last program of this (sequence, head group) to arrive combines every run's partial (in split
            # order) and resets the counter for the next launch; every thread's partial is written before one
            # thread releases the counter at GPU scope
            tl.debug_barrier()
            lock = lock_ptr + seq * tl.num_programs(1) + tl.program_id(1)
            arrived = tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu")
            if arrived == num_active - 1:
                m = tl.full([BLOCK_G], NEG_BIG, tl.float32)
                w_sum = tl.zeros([BLOCK_G], tl.float32)
                o = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
                for sp in range(0, num_active):
                    part_s = (seq * num_heads + heads) * num_splits + sp
                    # .cg: the other programs' partials from L2, never a stale L1 line
                    lse_s = tl.load(part_lse_ptr + part_s, mask=g_mask, other=float("-inf"), cache_modifier=".cg")
                    o_s = tl.load(
                        part_out_ptr + part_s[:, None].to(tl.int64) * BLOCK_DV + dv[None, :],
                        mask=out_mask,
                        other=0.0,
                        cache_modifier=".cg",
                    )
                    m_new = tl.maximum(m, lse_s)
                    a = tl.exp2(m - m_new)
                    b = tl.exp2(lse_s - m_new)
                    o = o * a[:, None] + tl.where(b[:, None] > 0, o_s, 0.0) * b[:, None]
                    w_sum = w_sum * a + b
                    m = m_new
                res = o / tl.where(w_sum > 0, w_sum, 1.0)[:, None]  # no keys (padding row): zeros
                tl.store(
                    out_ptr + seq * stride_ot + heads[:, None] * stride_oh + dv[None, :] * stride_od,
                    res.to(out_ptr.dtype.element_ty),
                    mask=out_mask,
                )
                tl.atomic_xchg(lock, 0)
    else:
        tl.store(part_out_ptr + part[:, None].to(tl.int64) * BLOCK_DV + dv[None, :], acc / l_i[:, None], mask=out_mask)
        tl.store(part_lse_ptr + part, m_i + tl.log2(l_i), mask=g_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    kv_seqlens_ptr,
    out_ptr,
    window,
    v_dim,
    num_splits,
    stride_ot,
    stride_oh,
    stride_od,
    WINDOW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    MIN_CHUNKS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    kv_len = tl.load(kv_seqlens_ptr + seq)
    splits = tl.arange(0, BLOCK_S)
    _, start, end, _ = _split_range(kv_len, window, splits, num_splits, WINDOW, BLOCK_N, MIN_CHUNKS)
    valid = (splits < num_splits) & (start < end)  # the same test the split programs used to skip
    part = (seq * tl.num_programs(1) + head) * num_splits + splits
    lse = tl.load(part_lse_ptr + part, mask=valid, other=float("-inf"))
    m = tl.maximum(tl.max(lse, axis=0), NEG_BIG)
    w = tl.where(valid, tl.exp2(lse - m), 0.0)
    dv = tl.arange(0, BLOCK_DV)
    parts = tl.load(part_out_ptr + part[:, None].to(tl.int64) * BLOCK_DV + dv[None, :], mask=valid[:, None], other=0.0)
    w_sum = tl.sum(w, axis=0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.where(w_sum > 0, w_sum, 1.0)  # no keys (padding row): zeros
    tl.store(
        out_ptr + seq * stride_ot + head * stride_oh + dv * stride_od, out.to(out_ptr.dtype.element_ty), mask=dv < v_dim
    )


# benchmarks switch it off to time the separate reduce kernel; read at call time, so before a graph is captured
FUSED_REDUCE_DEFAULT = True
# keys a split reads at least (rounded down to whole BLOCK_N chunks); min_split_keys overrides it per call. A grid of
# fewer (sequence, KV head) programs than half the SMs splits finer: batch-1 decode with the fused fill, 32 / 8 heads,
# block table of an 8,192-token session, H200 (benchmarks/kernel_sweep.py --only bs1), us at 128 / 320 / 512 / 1,024
# keys: head_dim 128 7.0 / 11.8 / 12.9 / 13.5 with 256 keys a split, 7.6 / 8.4 / 9.3 / 12.0 with 64; head_dim 64
# (128-key chunks) 4.7 / 7.4 / 8.2 / 8.8 vs 4.7 / 6.7 / 7.1 / 8.4
MIN_SPLIT_KEYS = 256
SMALL_GRID_MIN_SPLIT_KEYS = 64


def fusable_fill(
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    quant_bits: int = 0,
) -> bool:
    """Whether decode_attention can write this step's key/value itself: a plain (unquantized, same dtype) cache with
    separate key and value tensors, so the attended values are bit for bit those the cache then holds."""
    return (
        key is not None
        and value is not None
        and quant_bits == 0
        and k_cache.dtype == key.dtype
        and v_cache.dtype == value.dtype
        and v_cache.data_ptr() != k_cache.data_ptr()
        and key.dim() == 3
        and value.dim() == 3
        and key.shape[-1] == k_cache.shape[-1]
        and value.shape[-1] == v_cache.shape[-1]
    )


@functools.lru_cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def default_block_n(head_dim: int, v_dim: int, quant_bits: int = 0) -> int:
    """Keys per loop step: about 16 KiB of K per step, measured best on H200 (benchmarks/kernel_sweep.py sweep); an
    int8 cache at 128 channels takes 128 keys (16 KiB of codes): 749 vs 933 us at batch 256 x 2,048 keys on an H200
    (benchmarks/kv_quant_attention.py --sweep)."""
    block_d = max(sum(split_head_dim(head_dim)), triton.next_power_of_2(v_dim))
    if quant_bits == 8 and block_d == 128:
        return 128
    return 128 if block_d <= 64 else 64 if block_d <= 128 else 32


def default_block_g(group_size: int, head_dim: int) -> int:
    """Query heads per program: the whole group (at least 16, the smallest dot M) up to 64, or 32 past 256 channels
    (MLA), where a [BLOCK_G, 512] float32 accumulator is already 64 registers a thread."""
    return min(max(16, triton.next_power_of_2(group_size)), 32 if head_dim > 256 else 64)


def default_num_splits(num_seqs: int, num_kv_heads: int, max_kv_len: int, block_n: int, device: torch.device) -> int:
    """Enough programs for ~4 per SM (more splits only add partials to combine once the GPU is full), never
    more splits than chunks of the longest possible sequence."""
    wanted = triton.cdiv(4 * _num_sms(device), num_seqs * num_kv_heads)
    return max(1, min(wanted, triton.cdiv(max_kv_len, block_n), 64))


def decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    kv_seqlens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    logit_softcapping: float | None = None,
    v_head_dim: int | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    k_scales_zeros: torch.Tensor | None = None,
    v_scales_zeros: torch.Tensor | None = None,
    quant_bits: int = 0,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    fused_reduce: bool | None = None,
    min_split_keys: int | None = None,
) -> torch.Tensor:
    """query [num_seqs, heads, d] -> [num_seqs, heads, v_head_dim]; cache [num_blocks, block_size, kv_heads, d].

    key / value [num_seqs, kv_heads, d] with slot_mapping [num_seqs]: this step's keys and values, not yet in the
    cache; the kernel writes them at their slots (fill_kv_cache's job) and attends to them in the same launch
    (a plain cache of the keys' dtype only; `fusable_fill` says when). fused_reduce (default: when the counters
    suffice) combines the splits' partials in the split kernel's last program instead of a second launch.
    min_split_keys (default MIN_SPLIT_KEYS, SMALL_GRID_MIN_SPLIT_KEYS for a grid of fewer (sequence, KV head) programs
    than half the SMs): the fewest keys one split reads; 1 splits as finely as num_splits allows.

    block_tables [num_seqs, max_blocks] int32, kv_seqlens [num_seqs] int32 (keys visible to each query, its own
    included). out, if given, receives the result. num_splits / block_n / num_warps / num_stages override the
    launch heuristics (the benchmark sweeps them). quant_bits 8 / 4: the caches hold uint8 codes
    [..., d * quant_bits // 8] with k/v_scales_zeros [num_blocks, block_size, kv_heads, 2] float32, dequantized
    as the tiles load (fill_kv_cache writes them).
    """
    num_seqs, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    (k_dim, v_cache_dim), k_sz, v_sz, sz_strides = kv_quant_args(
        k_cache, v_cache, k_scales_zeros, v_scales_zeros, quant_bits
    )
    v_dim = v_head_dim or v_cache_dim
    if k_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"query {tuple(query.shape)} does not fit k_cache {tuple(k_cache.shape)}")
    if v_cache.shape[:3] != k_cache.shape[:3] or v_dim > v_cache_dim:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} does not fit k_cache {tuple(k_cache.shape)}")
    if block_tables.shape[0] != num_seqs or kv_seqlens.shape != (num_seqs,):
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} / kv_seqlens {tuple(kv_seqlens.shape)} "
            f"do not match {num_seqs} sequences"
        )
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    group_size = num_heads // num_kv_heads
    block_d1, block_d2 = split_head_dim(head_dim)
    block_dv = triton.next_power_of_2(v_dim)
    block_n = block_n or default_block_n(head_dim, v_dim, quant_bits)
    block_g = default_block_g(group_size, head_dim)
    if num_splits is None:
        num_splits = default_num_splits(
            num_seqs, num_kv_heads, block_tables.shape[1] * block_size, block_n, query.device
        )
    out = check_out(out, query, (num_seqs, num_heads, v_dim))
    fill = key is not None
    if fill:
        if not fusable_fill(key, value, k_cache, v_cache, quant_bits) or slot_mapping is None:
            raise ValueError("decode_attention: key/value fill needs a plain cache of their dtype and a slot_mapping")
        if key.shape != (num_seqs, num_kv_heads, head_dim) or value.shape != (num_seqs, num_kv_heads, v_dim):
            raise ValueError(f"key {tuple(key.shape)} / value {tuple(value.shape)} do not fit the query and cache")
        if slot_mapping.shape != (num_seqs,):
            raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} must be [{num_seqs}]")
    if num_seqs == 0:
        return out
    head_blocks = triton.cdiv(group_size, block_g)
    if min_split_keys is None:
        small = num_seqs * num_kv_heads * head_blocks * 2 < _num_sms(query.device)
        min_split_keys = SMALL_GRID_MIN_SPLIT_KEYS if small else MIN_SPLIT_KEYS
    min_chunks = max(1, min_split_keys // block_n)
    locks = splitk_locks(query.device) if query.is_cuda else torch.zeros(NUM_LOCKS, dtype=torch.int32)
    if fused_reduce is None:
        fused_reduce = FUSED_REDUCE_DEFAULT and num_seqs * num_kv_heads * head_blocks <= NUM_LOCKS
    part_out = torch.empty(num_seqs, num_heads, num_splits, block_dv, dtype=torch.float32, device=query.device)
    part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=query.device)
    window = sliding_window or 0
    softcap = logit_softcapping or 0.0
    grid = (num_seqs, num_kv_heads * head_blocks, num_splits)
    shared_kv = shares_kv(k_cache, v_cache, v_dim, block_d1)
    if shared_kv and quant_bits:
        raise ValueError("a quantized cache cannot be shared by keys and values (MLA latent cache)")
    if shared_kv and fill:
        raise ValueError("decode_attention: no fused fill into a cache shared by keys and values")
    new_k, new_v = (key, value) if fill else (query, query)
    zero3 = (0, 0, 0)
    _decode_split_kernel[grid](
        query,
        k_cache,
        v_cache,
        k_sz,
        v_sz,
        block_tables,
        kv_seqlens,
        part_out,
        part_lse,
        new_k,
        new_v,
        slot_mapping if fill else kv_seqlens,
        out,
        locks,
        scale,
        softcap,
        window,
        num_heads,
        group_size,
        head_dim,
        v_dim,
        block_size,
        num_splits,
        *query.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *sz_strides,
        block_tables.stride(0),
        *(key.stride() if fill else zero3),
        *(value.stride() if fill else zero3),
        *out.stride(),
        SOFTCAP=bool(softcap),
        WINDOW=bool(window),
        BLOCK_G=block_g,
        BLOCK_N=block_n,
        BLOCK_D1=block_d1,
        BLOCK_D2=block_d2,
        BLOCK_DV=block_dv,
        SHARED_KV=shared_kv,
        QUANT=quant_bits,
        DOT_PRECISION=dot_precision(query.dtype),
        FUSED_FILL=fill,
        FUSED_REDUCE=fused_reduce,
        MIN_CHUNKS=min_chunks,
        num_warps=num_warps if head_dim <= 256 else max(num_warps, 8),
        num_stages=num_stages,
    )
    if fused_reduce:
        return out
    _decode_reduce_kernel[(num_seqs, num_heads)](
        part_out,
        part_lse,
        kv_seqlens,
        out,
        window,
        v_dim,
        num_splits,
        *out.stride(),
        WINDOW=bool(window),
        BLOCK_N=block_n,
        BLOCK_S=triton.next_power_of_2(num_splits),
        BLOCK_DV=block_dv,
        MIN_CHUNKS=min_chunks,
        num_warps=4,
    )
    return out


stable_cache_keys(globals())
