"""Variable-length causal attention whose keys and values come from the paged cache (prefill and
mixed batches).

Queries are the flat new tokens (sequence i owns rows q_start_loc[i] : +q_seqlens[i]); the cache holds
all kv_seqlens[i] keys of sequence i, the last q_seqlens[i] of them being this step's tokens. So query
row r of sequence i sits at position kv_seqlens[i] - q_seqlens[i] + r, which is what makes chunked
prefill and prefix caching work: a cached prefix is just keys that no query of this step wrote.
Flash-attention style: one program per (query head, BLOCK_M queries, sequence), online softmax over
BLOCK_N keys at a time; key chunks that every query of the block may see skip the causal mask.
"""

from __future__ import annotations

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
    shares_kv,
    split_head_dim,
    stable_cache_keys,
    tanh,
)


@triton.jit
def _attend_chunk(
    q1,
    qk1,
    qk2,
    q_sum,
    q_scale,
    acc,
    m_i,
    l_i,
    chunk,
    pos,
    kv_len,
    window,
    table,
    k_head,
    v_head,
    k_sz_head,
    v_sz_head,
    block_size,
    head_dim,
    v_dim,
    stride_kb,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vd,
    stride_zb,
    stride_zs,
    scale,
    softcap,
    MASKED: tl.constexpr,
    SOFTCAP: tl.constexpr,
    WINDOW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    SHARED_KV: tl.constexpr,
    QUANT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    j = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    j_mask = j < kv_len
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
        False,
        DOT_PRECISION,
    )  # [BLOCK_M, BLOCK_N]
    if SOFTCAP:
        s = softcap * tanh(s * (scale / softcap)) * LOG2E
    else:
        s = s * (scale * LOG2E)
    if MASKED:
        visible = (j[None, :] <= pos[:, None]) & j_mask[None, :]
        if WINDOW:
            visible = visible & ((pos[:, None] - j[None, :]) < window)
        s = tl.where(visible, s, float("-inf"))
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
            False,
            DOT_PRECISION,
        )
    return acc, m_new, l_i


# block-table width varies per step: specialising on it would compile a variant mid-serving
@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_sz_ptr,
    v_sz_ptr,
    out_ptr,
    block_tables_ptr,
    q_start_ptr,
    q_seqlens_ptr,
    kv_seqlens_ptr,
    scale,
    softcap,
    window,
    group_size,
    head_dim,
    v_dim,
    block_size,
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
    stride_ot,
    stride_oh,
    stride_od,
    stride_bt,
    SOFTCAP: tl.constexpr,
    WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    SHARED_KV: tl.constexpr,
    QUANT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # heads vary fastest in launch order, so the group_size heads reading the same keys run together (L2 reuse)
    head = tl.program_id(0)
    m_block = tl.program_id(1)
    seq = tl.program_id(2)
    q_len = tl.load(q_seqlens_ptr + seq)
    if m_block * BLOCK_M >= q_len:
        return
    q_start = tl.load(q_start_ptr + seq).to(tl.int64)
    kv_len = tl.load(kv_seqlens_ptr + seq)
    kv_head = head // group_size

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < q_len
    pos = kv_len - q_len + rows  # position of each query among its sequence's keys
    # head channels [0, BLOCK_D1) always exist (BLOCK_D1 <= head_dim); [BLOCK_D1, head_dim) is the masked tail
    d1 = tl.arange(0, BLOCK_D1)
    dv = tl.arange(0, BLOCK_DV)
    dv_mask = dv[None, :] < v_dim
    q_rows = q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh
    q1 = tl.load(q_rows + d1[None, :] * stride_qd, mask=row_mask[:, None], other=0.0)
    if BLOCK_D2 > 0:
        d2 = BLOCK_D1 + tl.arange(0, BLOCK_D2)
        q2 = tl.load(q_rows + d2[None, :] * stride_qd, mask=row_mask[:, None] & (d2[None, :] < head_dim), other=0.0)
    else:  # placeholder, never read
        q2 = q1
    # tiles of quantized keys are dequantized as they load (attn_scores FACTORED False): the query as it is
    qk1, qk2, q_sum, q_scale = q1, q2, tl.zeros([BLOCK_M], tl.float32), tl.full([BLOCK_M], 1.0, tl.float32)
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh
    k_sz_head = k_sz_ptr + kv_head * stride_zh
    v_sz_head = v_sz_ptr + kv_head * stride_zh
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt

    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    first_pos = kv_len - q_len + m_block * BLOCK_M
    last_pos = tl.minimum(first_pos + BLOCK_M, kv_len) - 1
    if WINDOW:  # the earliest key any query of the block may see; every chunk gets the full mask
        lo_chunk = tl.maximum(first_pos - window + 1, 0) // BLOCK_N
    else:  # chunks wholly at or before the first query's position are visible to every query
        lo_chunk = (first_pos + 1) // BLOCK_N
        for chunk in range(0, lo_chunk):
            acc, m_i, l_i = _attend_chunk(
                q1,
                qk1,
                qk2,
                q_sum,
                q_scale,
                acc,
                m_i,
                l_i,
                chunk,
                pos,
                kv_len,
                window,
                table,
                k_head,
                v_head,
                k_sz_head,
                v_sz_head,
                block_size,
                head_dim,
                v_dim,
                stride_kb,
                stride_ks,
                stride_kd,
                stride_vb,
                stride_vs,
                stride_vd,
                stride_zb,
                stride_zs,
                scale,
                softcap,
                False,
                SOFTCAP,
                WINDOW,
                BLOCK_N,
                BLOCK_D1,
                BLOCK_D2,
                BLOCK_DV,
                SHARED_KV,
                QUANT,
                DOT_PRECISION,
            )
    for chunk in range(lo_chunk, tl.cdiv(last_pos + 1, BLOCK_N)):
        acc, m_i, l_i = _attend_chunk(
            q1,
            qk1,
            qk2,
            q_sum,
            q_scale,
            acc,
            m_i,
            l_i,
            chunk,
            pos,
            kv_len,
            window,
            table,
            k_head,
            v_head,
            k_sz_head,
            v_sz_head,
            block_size,
            head_dim,
            v_dim,
            stride_kb,
            stride_ks,
            stride_kd,
            stride_vb,
            stride_vs,
            stride_vd,
            stride_zb,
            stride_zs,
            scale,
            softcap,
            True,
            SOFTCAP,
            WINDOW,
            BLOCK_N,
            BLOCK_D1,
            BLOCK_D2,
            BLOCK_DV,
            SHARED_KV,
            QUANT,
            DOT_PRECISION,
        )

    out = acc / l_i[:, None]
    tl.store(
        out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + dv[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & dv_mask,
    )


# shared memory kept for the q tile and the pipelined k/v tiles; the rest of the ~227 KiB an H100 block may use
# is left to Triton's layout-conversion scratch
_SMEM_BUDGET = 160 * 1024


def _launch_config(
    block_dk: int, block_dv: int, shared_kv: bool, elem_size: int, max_q_seqlen: int
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): register/shared-memory budget by head dim.

    Up to 256 channels the measured defaults; beyond (MLA: 576 key / 512 value channels) the largest tile whose q
    tile plus num_stages k/v tiles fits _SMEM_BUDGET, with BLOCK_M <= 32 so the [BLOCK_M, BLOCK_DV] float32
    accumulator stays in registers."""
    if max(block_dk, block_dv) <= 64:
        return (64, 64, 4, 2) if max_q_seqlen <= 64 else (128, 64, 4, 2)
    if max(block_dk, block_dv) <= 128:
        return (64, 64, 4, 2) if max_q_seqlen <= 64 else (128, 64, 8, 2)
    if max(block_dk, block_dv) <= 256:
        return 64, 32, 8, 2
    kv_row = block_dk + (0 if shared_kv else block_dv)
    candidates = ((32, 64, 8, 2), (32, 32, 8, 2), (32, 32, 4, 1))
    for block_m, block_n, num_warps, num_stages in candidates:
        if elem_size * (block_m * block_dk + num_stages * block_n * kv_row) <= _SMEM_BUDGET:
            return block_m, block_n, num_warps, num_stages
    return 16, 16, 4, 1


def prefill_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    q_start_loc: torch.Tensor,
    q_seqlens: torch.Tensor,
    kv_seqlens: torch.Tensor,
    max_q_seqlen: int,
    scale: float,
    sliding_window: int | None = None,
    logit_softcapping: float | None = None,
    v_head_dim: int | None = None,
    out: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
    k_scales_zeros: torch.Tensor | None = None,
    v_scales_zeros: torch.Tensor | None = None,
    quant_bits: int = 0,
) -> torch.Tensor:
    """query [num_tokens, heads, d] -> [num_tokens, heads, v_head_dim]; cache [num_blocks, block_size, kv_heads, d].

    Per-sequence tensors (block_tables [num_seqs, max_blocks], q_start_loc, q_seqlens, kv_seqlens [num_seqs])
    are int32 on the device; max_q_seqlen (a host int, at least every q_seqlens[i]) sizes the grid.
    out, if given, receives the result; config (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides the launch
    heuristic (the benchmark sweeps it). quant_bits 8 / 4: uint8 caches with k/v_scales_zeros, as in
    decode_attention.
    """
    num_tokens, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    (k_dim, v_cache_dim), k_sz, v_sz, sz_strides = kv_quant_args(
        k_cache, v_cache, k_scales_zeros, v_scales_zeros, quant_bits
    )
    v_dim = v_head_dim or v_cache_dim
    num_seqs = q_seqlens.shape[0]
    if k_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"query {tuple(query.shape)} does not fit k_cache {tuple(k_cache.shape)}")
    if v_cache.shape[:3] != k_cache.shape[:3] or v_dim > v_cache_dim:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} does not fit k_cache {tuple(k_cache.shape)}")
    if block_tables.shape[0] != num_seqs or q_start_loc.shape != (num_seqs,) or kv_seqlens.shape != (num_seqs,):
        raise ValueError("block_tables, q_start_loc, q_seqlens and kv_seqlens must all have num_seqs rows")
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    out = check_out(out, query, (num_tokens, num_heads, v_dim))
    if num_tokens == 0 or max_q_seqlen <= 0:
        return out
    block_d1, block_d2 = split_head_dim(head_dim)
    block_dv = triton.next_power_of_2(v_dim)
    shared_kv = shares_kv(k_cache, v_cache, v_dim, block_d1)
    if shared_kv and quant_bits:
        raise ValueError("a quantized cache cannot be shared by keys and values (MLA latent cache)")
    block_m, block_n, num_warps, num_stages = config or _launch_config(
        block_d1 + block_d2, block_dv, shared_kv, query.element_size(), max_q_seqlen
    )
    window = sliding_window or 0
    softcap = logit_softcapping or 0.0
    grid = (num_heads, triton.cdiv(max_q_seqlen, block_m), num_seqs)
    _prefill_attention_kernel[grid](
        query,
        k_cache,
        v_cache,
        k_sz,
        v_sz,
        out,
        block_tables,
        q_start_loc,
        q_seqlens,
        kv_seqlens,
        scale,
        softcap,
        window,
        num_heads // num_kv_heads,
        head_dim,
        v_dim,
        block_size,
        *query.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *sz_strides,
        *out.stride(),
        block_tables.stride(0),
        SOFTCAP=bool(softcap),
        WINDOW=bool(window),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D1=block_d1,
        BLOCK_D2=block_d2,
        BLOCK_DV=block_dv,
        SHARED_KV=shared_kv,
        QUANT=quant_bits,
        DOT_PRECISION=dot_precision(query.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


stable_cache_keys(globals())
