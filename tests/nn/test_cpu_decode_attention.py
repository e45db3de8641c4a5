"""The CPU decode attention (one query per sequence) against a per-sequence softmax(q k^T * scale) v reference,
on both of its paths: few sequences (one copy of the keys, matmuls over all heads) and many (a strided batched
GEMM pair per KV head), fp32 and bf16, with GQA, a sliding window and logit soft-capping."""

from __future__ import annotations

import pytest
import torch

from lmforge.backends.cpu import attention as cpu
from lmforge.model_inputs import AttnMetadata, AttnOptions

HEADS, KV_HEADS, DIM, BLOCK = 6, 2, 16, 8


def _setup(kv_lens: list[int], dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // BLOCK) for n in kv_lens) + 3
    k_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    width = max(-(-n // BLOCK) for n in kv_lens)
    tables = torch.zeros(len(kv_lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(kv_lens):
        nb = -(-n // BLOCK)
        tables[i, :nb] = perm[used : used + nb].int()
        used += nb
    ones = torch.ones(len(kv_lens), dtype=torch.int32)
    meta = AttnMetadata(
        is_decoding=True,
        block_tables=tables,
        q_start_loc=torch.arange(len(kv_lens), dtype=torch.int32),
        q_seqlens=ones,
        kv_seqlens=torch.tensor(kv_lens, dtype=torch.int32),
        slot_mapping=torch.zeros(len(kv_lens), dtype=torch.int64),
        max_q_seqlen=1,
        max_kv_seqlen=max(kv_lens),
        block_size=BLOCK,
        q_seqlens_list=[1] * len(kv_lens),
        kv_seqlens_list=list(kv_lens),
    )
    query = torch.randn(len(kv_lens), HEADS, DIM, generator=gen).to(dtype)
    return query, k_cache, v_cache, meta


def _reference(query, k_cache, v_cache, meta, opts):
    out = []
    for i, n in enumerate(meta.kv_seqlens_list):
        rows = torch.cat([k_cache[b] for b in meta.block_tables[i].tolist()])[:n].float()  # [n, kv_heads, dim]
        vals = torch.cat([v_cache[b] for b in meta.block_tables[i].tolist()])[:n].float()
        rep = HEADS // KV_HEADS
        k, v = rows.repeat_interleave(rep, 1), vals.repeat_interleave(rep, 1)  # [n, heads, dim]
        scores = torch.einsum("hd,nhd->hn", query[i].float(), k) * opts.scale
        if opts.logit_softcapping:
            scores = torch.tanh(scores / opts.logit_softcapping) * opts.logit_softcapping
        if opts.sliding_window:
            scores[:, : max(0, n - opts.sliding_window)] = float("-inf")
        out.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v))
    return torch.stack(out)


@pytest.mark.parametrize("num_seqs", [2, cpu._PER_HEAD_DECODE_MIN_SEQS + 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["plain", "window", "softcap"])
def test_decode_attention_matches_reference(num_seqs, dtype, variant):
    kv_lens = [5 + 7 * i for i in range(num_seqs)]  # ragged, some ending mid-block
    query, k_cache, v_cache, meta = _setup(kv_lens, dtype)
    opts = AttnOptions(
        DIM**-0.5,
        sliding_window=6 if variant == "window" else None,
        logit_softcapping=5.0 if variant == "softcap" else None,
    )
    out = cpu.paged_attention(query, k_cache, v_cache, meta, opts)
    assert out.shape == (num_seqs, HEADS, DIM) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), _reference(query, k_cache, v_cache, meta, opts), atol=tol, rtol=tol)
