"""Quantized KV caches on the CPU backend (the reference of the CUDA kernels): int8 / int4 (quant_policy 8 / 4,
per-token per-head asymmetric scale and zero point) and FP8 e4m3 (scale 1.0), written by fill_kv_cache and read
by paged_attention, in prefill and decode layouts."""

from __future__ import annotations

import pytest
import torch

from lmforge.backends.cpu import attention as cpu
from lmforge.model_inputs import AttnMetadata, AttnOptions, QuantizedCache

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 4, 2, 64, 16
FORMATS = ["int8", "int4", "fp8"]


def _metadata(q_lens: list[int], kv_lens: list[int], num_blocks: int, seed: int = 0) -> AttnMetadata:
    """Sequences over shuffled blocks; slot_mapping names every one of their kv_lens slots (the whole history is
    written in one fill, so the test checks attention over a cache that only fill_kv_cache wrote)."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = [-(-kv // BLOCK_SIZE) for kv in kv_lens]
    perm = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros(len(kv_lens), max(per_seq) + 1, dtype=torch.int32)
    used, slots = 0, []
    for i, (n, kv) in enumerate(zip(per_seq, kv_lens, strict=True)):
        block_tables[i, :n] = perm[used : used + n].int()
        used += n
        slots += [int(block_tables[i, p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE for p in range(kv)]
    q = torch.tensor(q_lens, dtype=torch.int32)
    return AttnMetadata(
        is_decoding=all(n == 1 for n in q_lens),
        block_tables=block_tables,
        q_start_loc=(torch.cumsum(q, 0) - q).int(),
        q_seqlens=q,
        kv_seqlens=torch.tensor(kv_lens, dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_q_seqlen=max(q_lens),
        max_kv_seqlen=max(kv_lens),
        block_size=BLOCK_SIZE,
        q_seqlens_list=list(q_lens),
        kv_seqlens_list=list(kv_lens),
    )


def _empty_cache(fmt: str, num_blocks: int, head_dim: int = HEAD_DIM):
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS)
    if fmt == "fp8":
        return torch.zeros(*shape, head_dim, dtype=torch.float8_e4m3fn)
    if fmt == "fp32":
        return torch.zeros(*shape, head_dim)
    bits = 8 if fmt == "int8" else 4
    return QuantizedCache(torch.zeros(*shape, head_dim * bits // 8, dtype=torch.uint8), torch.zeros(*shape, 2), bits)


def _stored(cache, num_slots: int, head_dim: int = HEAD_DIM) -> torch.Tensor:
    """What the cache holds, read back as float32 [num_blocks * block_size, kv_heads, head_dim]."""
    if isinstance(cache, QuantizedCache):
        flat = cache.data.flatten(0, 1), cache.scales_zeros.flatten(0, 1)
        return cpu.dequantize_kv(*flat, cache.bits, torch.float32)
    return cache.flatten(0, 1).float()


CASES = {"decode": ([1, 1, 1], [1, 40, 77]), "prefill": ([37, 5, 20], [37, 5, 20]), "chunked": ([3, 9], [50, 33])}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_attention_over_quantized_cache(fmt, case):
    """The quantized cache's attention equals fp32 attention over its dequantized keys/values (tight: only the
    dequantization happens in a different place), and stays within a stated distance of unquantized attention."""
    torch.manual_seed(0)
    q_lens, kv_lens = CASES[case]
    num_blocks = sum(-(-kv // BLOCK_SIZE) for kv in kv_lens) + 2
    meta = _metadata(q_lens, kv_lens, num_blocks)
    num_tokens = len(meta.slot_mapping)
    key, value = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM), torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM)
    query = torch.randn(sum(q_lens), NUM_HEADS, HEAD_DIM)
    opts = AttnOptions(HEAD_DIM**-0.5)

    k_cache, v_cache = _empty_cache(fmt, num_blocks), _empty_cache(fmt, num_blocks)
    cpu.fill_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping)
    out = cpu.paged_attention(query, k_cache, v_cache, meta, opts)

    k_deq = _stored(k_cache, num_blocks * BLOCK_SIZE).view(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    v_deq = _stored(v_cache, num_blocks * BLOCK_SIZE).view(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    torch.testing.assert_close(out, cpu.paged_attention(query, k_deq, v_deq, meta, opts), atol=1e-5, rtol=1e-5)

    k_ref, v_ref = _empty_cache("fp32", num_blocks), _empty_cache("fp32", num_blocks)
    cpu.fill_kv_cache(key, value, k_ref, v_ref, meta.slot_mapping)
    exact = cpu.paged_attention(query, k_ref, v_ref, meta, opts)
    # unit-variance keys/values: int8 rows step by ~6/255, int4 by ~6/15, fp8 by 2**-4 relative; a query that
    # sees one key returns that value's own rounding error (measured worst: 0.022 / 0.26 / 0.13, mean 0.0024 /
    # 0.041 / 0.011)
    max_err, mean_err = {"int8": (0.04, 0.005), "int4": (0.5, 0.08), "fp8": (0.25, 0.025)}[fmt]
    err = (out - exact).abs()
    assert err.max() < max_err and err.mean() < mean_err, (err.max(), err.mean())


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_kv_rounds_to_the_nearest_step(bits):
    """Each value comes back within half a step of its row's scale; each row's min and max are hit exactly."""
    torch.manual_seed(1)
    x = torch.randn(50, 3, 32) * torch.rand(50, 3, 1) * 10 + torch.randn(50, 3, 1)
    q, scales_zeros = cpu.quantize_kv(x, bits)
    assert q.dtype == torch.uint8 and q.shape == (50, 3, 32 * bits // 8) and scales_zeros.shape == (50, 3, 2)
    back = cpu.dequantize_kv(q, scales_zeros, bits, torch.float32)
    scale = scales_zeros[..., :1]
    assert ((back - x).abs() <= scale * 0.5 + 1e-5 * x.abs().amax(-1, keepdim=True)).all()
    torch.testing.assert_close(back.amin(-1), x.amin(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back.amax(-1), x.amax(-1), atol=1e-5, rtol=1e-5)


def test_int4_packs_even_channels_low_and_odd_channels_high():
    # a row 0, 1, ..., 15 has min 0 and step 1: the codes are the values themselves
    x = torch.arange(16.0).view(1, 16)
    q, scales_zeros = cpu.quantize_kv(x, 4)
    assert q.tolist() == [[0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]]
    torch.testing.assert_close(scales_zeros, torch.tensor([[1.0, 0.0]]))
    q8, _ = cpu.quantize_kv(x * 17, 8)  # min 0, step 1: int8 codes 0, 17, ..., 255
    assert q8.tolist() == [list(range(0, 256, 17))]


def test_constant_rows_and_fp8_range():
    q, scales_zeros = cpu.quantize_kv(torch.full((2, 8), 3.5), 8)
    assert torch.isfinite(scales_zeros).all()
    torch.testing.assert_close(cpu.dequantize_kv(q, scales_zeros, 8, torch.float32), torch.full((2, 8), 3.5))
    cache = torch.zeros(1, 4, 1, 2, dtype=torch.float8_e4m3fn)
    cpu.fill_kv_cache(torch.tensor([[[1000.0, -1e6]], [[0.1, 2.0]]]), None, cache, None, torch.tensor([0, 3]))
    assert cache.float().flatten().tolist() == pytest.approx([448.0, -448.0, 0, 0, 0, 0, 0.1015625, 2.0])


def test_fp8_latent_cache_shared_by_keys_and_values():
    """MLA keeps one latent cache (keys, and values as its first v_head_dim channels): fp8 works on it as on any
    cache (quant_policy is refused for it, see tests/engine/test_kv_cache_quant.py)."""
    torch.manual_seed(2)
    meta = _metadata([1, 6], [20, 6], 4)
    latent = torch.randn(len(meta.slot_mapping), 1, 40)
    query = torch.randn(7, 8, 40)
    opts = AttnOptions(0.15, v_head_dim=32)
    cache = torch.zeros(4, BLOCK_SIZE, 1, 40, dtype=torch.float8_e4m3fn)
    cpu.fill_kv_cache(latent, None, cache, None, meta.slot_mapping)
    out = cpu.paged_attention(query, cache, cache, meta, opts)
    assert out.shape == (7, 8, 32)
    as_fp32 = cache.float()
    torch.testing.assert_close(out, cpu.paged_attention(query, as_fp32, as_fp32, meta, opts), atol=1e-5, rtol=1e-5)
