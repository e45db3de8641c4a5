"""Quantized KV caches on the Triton kernels (int8 / int4 QuantizedCache, FP8 e4m3) against the CPU reference:
fill_kv_cache writes the reference's codes and scales, decode and prefill attention dequantize as the reference
does, and the decode op replays in a CUDA graph."""

import os

import pytest
import torch

pytest.importorskip("triton")

from lmforge.backends import cpu as cpu_backend  # noqa: E402
from lmforge.backends import cuda as cuda_backend  # noqa: E402
from lmforge.backends.cpu.attention import dequantize_kv  # noqa: E402
from lmforge.model_inputs import AttnOptions, QuantizedCache  # noqa: E402

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
FORMATS = ["int8", "int4", "fp8"]


def _empty(fmt: str, num_blocks: int, block_size: int, heads: int, dim: int, device) -> torch.Tensor | QuantizedCache:
    shape = (num_blocks, block_size, heads)
    if fmt == "fp8":
        return torch.zeros(*shape, dim, dtype=torch.float8_e4m3fn, device=device)
    bits = 8 if fmt == "int8" else 4
    return QuantizedCache(
        torch.zeros(*shape, dim * bits // 8, dtype=torch.uint8, device=device),
        torch.zeros(*shape, 2, device=device),
        bits,
    )


def _clone(cache):
    if isinstance(cache, QuantizedCache):
        return QuantizedCache(cache.data.clone(), cache.scales_zeros.clone(), cache.bits)
    return cache.clone()


def _values(cache) -> torch.Tensor:
    if isinstance(cache, QuantizedCache):
        return dequantize_kv(cache.data, cache.scales_zeros, cache.bits, torch.float32)
    return cache.float()


@pytest.mark.parametrize("head_dim", [64, 128, 96])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fill_kv_cache_quantized(device, check_dtype, dtype, fmt, block_size, head_dim):
    check_dtype(dtype)
    if fmt == "fp8" and os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter's float8 cast drops the carry of a round-up (1.97 -> 1.0)")
    num_tokens, num_kv_heads, num_blocks = 37, 2, 6
    qkv = torch.randn(num_tokens, 3 * num_kv_heads * head_dim, device=device).mul_(3).to(dtype)
    _, k, v = qkv.split(num_kv_heads * head_dim, dim=-1)  # strided views, as the model produces them
    key, value = k.unflatten(-1, (num_kv_heads, head_dim)), v.unflatten(-1, (num_kv_heads, head_dim))
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slots[3] = -1  # a padding token: nothing written
    caches = [_empty(fmt, num_blocks, block_size, num_kv_heads, head_dim, device) for _ in range(2)]
    refs = [_clone(c) for c in caches]
    cuda_backend.fill_kv_cache(key, value, *caches, slots)
    keep = slots >= 0
    cpu_backend.fill_kv_cache(key[keep], value[keep], *refs, slots[keep])
    for got, ref in zip(caches, refs, strict=True):
        if fmt == "fp8":
            assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
            continue
        torch.testing.assert_close(got.scales_zeros, ref.scales_zeros, rtol=1e-6, atol=1e-6)
        # a value on a rounding tie may land one step apart (fused multiply-add on the GPU): at most one step
        assert (got.data.int() - ref.data.int()).abs().le(1 if fmt == "int8" else 17).all()
        scale = ref.scales_zeros[..., :1]
        assert ((_values(got) - _values(ref)).abs() <= scale * 1.01).all()
        assert (got.data != ref.data).float().mean() < 1e-3


def _quantized_batch(
    paged_batch, fmt, q_lens, kv_lens, heads, kv_heads, head_dim, block_size, dtype, device, offset=0.0
):
    """paged_batch's layout, its caches replaced by quantized ones that every slot (stale ones included) was
    written to through the reference fill. offset shifts the cached values (a large zero point)."""
    batch = paged_batch(q_lens, kv_lens, heads, kv_heads, head_dim, block_size, dtype, device)
    num_blocks = batch["k_cache"].shape[0]
    all_slots = torch.arange(num_blocks * block_size, device=device)
    for name in ("k_cache", "v_cache"):
        rows = batch[name].flatten(0, 1) + offset
        batch[name] = _empty(fmt, num_blocks, block_size, kv_heads, head_dim, device)
        cpu_backend.fill_kv_cache(rows, None, batch[name], None, all_slots)
    return batch


def _reference(batch, opts):
    k, v = _values(batch["k_cache"]), _values(batch["v_cache"])
    return cpu_backend.paged_attention(batch["query"].float(), k, v, batch["meta"], opts)


DECODE = ([1] * 5, [1, 17, 64, 130, 257])
PREFILL = {"prefill": ([37, 100, 5, 64], [37, 100, 5, 64]), "chunked": ([1, 17, 40, 9], [30, 17, 73, 200])}


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("case", ["decode", "prefill", "chunked"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_over_quantized_cache(device, check_dtype, paged_batch, tol, dtype, fmt, case, block_size, head_dim):
    check_dtype(dtype)
    q_lens, kv_lens = DECODE if case == "decode" else PREFILL[case]
    batch = _quantized_batch(paged_batch, fmt, q_lens, kv_lens, 16, 4, head_dim, block_size, dtype, device)
    opts = AttnOptions(head_dim**-0.5)
    out = cuda_backend.paged_attention(batch["query"], batch["k_cache"], batch["v_cache"], batch["meta"], opts)
    torch.testing.assert_close(out.float(), _reference(batch, opts), **tol(dtype))


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_attention_window_softcap_and_odd_head_dim(device, paged_batch, tol, fmt):
    opts = AttnOptions(0.1, sliding_window=40, logit_softcapping=2.0)
    for q_lens, kv_lens in (DECODE, PREFILL["chunked"]):
        batch = _quantized_batch(paged_batch, fmt, q_lens, kv_lens, 8, 2, 96, 16, torch.float16, device)
        out = cuda_backend.paged_attention(batch["query"], batch["k_cache"], batch["v_cache"], batch["meta"], opts)
        torch.testing.assert_close(out.float(), _reference(batch, opts), **tol(torch.float16))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_attention_float32_and_offset_values(device, paged_batch, tol, fmt):
    """The kernels put the codes into the dot and apply scale and zero point to its result: exact in float32, and
    no loss to cancellation when every value sits far from zero (zero points near the top of the code range)."""
    opts = AttnOptions(64**-0.5)
    for dtype, offset in ((torch.float32, 0.0), (torch.float16, 40.0)):
        for q_lens, kv_lens in (DECODE, PREFILL["chunked"]):
            batch = _quantized_batch(paged_batch, fmt, q_lens, kv_lens, 8, 2, 64, 16, dtype, device, offset)
            out = cuda_backend.paged_attention(batch["query"], batch["k_cache"], batch["v_cache"], batch["meta"], opts)
            ref = _reference(batch, opts)
            torch.testing.assert_close(out.float(), ref, **tol(dtype) if offset == 0 else {"atol": 2e-2, "rtol": 1e-3})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_mla_latent_cache(device, check_dtype, paged_batch, tol, dtype):
    """DeepSeek-V3's shared latent cache (576 channels, values the first 512) stored as fp8."""
    check_dtype(dtype)
    opts = AttnOptions(576**-0.5, v_head_dim=512)
    for q_lens, kv_lens in (([1] * 3, [5, 33, 80]), ([3, 20, 70], [10, 20, 90])):
        batch = paged_batch(q_lens, kv_lens, 16, 1, 576, 16, dtype, device, v_head_dim=512)
        batch["k_cache"] = batch["v_cache"] = batch["k_cache"].to(torch.float8_e4m3fn)
        out = cuda_backend.paged_attention(batch["query"], batch["k_cache"], batch["v_cache"], batch["meta"], opts)
        torch.testing.assert_close(out.float(), _reference(batch, opts), **tol(dtype))


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_decode_cuda_graph_replay(paged_batch, fmt):
    """fill + decode attention on a quantized cache captured once, replayed over new keys and queries."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA graphs")
    torch.manual_seed(0)
    device = torch.device("cuda")
    batch = _quantized_batch(paged_batch, fmt, *DECODE, 16, 4, 128, 64, torch.bfloat16, device)
    opts = AttnOptions(128**-0.5)
    meta, num_seqs = batch["meta"], len(DECODE[0])
    new_k = torch.randn(num_seqs, 4, 128, device=device, dtype=torch.bfloat16)
    new_v = torch.randn_like(new_k)

    def step() -> torch.Tensor:
        cuda_backend.fill_kv_cache(new_k, new_v, batch["k_cache"], batch["v_cache"], meta.slot_mapping)
        return cuda_backend.paged_attention(batch["query"], batch["k_cache"], batch["v_cache"], meta, opts)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = step()
    for _ in range(3):
        batch["query"].copy_(torch.randn_like(batch["query"]))
        new_k.copy_(torch.randn_like(new_k))
        new_v.copy_(torch.randn_like(new_v))
        graph.replay()
        torch.cuda.synchronize()
        replayed = graph_out.clone()
        assert torch.equal(replayed, step())
        torch.testing.assert_close(replayed.float(), _reference(batch, opts), atol=2e-2, rtol=2e-2)
