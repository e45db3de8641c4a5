"""Paged attention kernels (split-K decode, varlen prefill over the cache) against the cpu reference in float32."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

pytest.importorskip("triton")

from lmforge.backends import cpu as cpu_backend  # noqa: E402
from lmforge.backends import cuda as cuda_backend  # noqa: E402
from lmforge.kernels.cuda.decode_attention import decode_attention  # noqa: E402
from lmforge.kernels.cuda.prefill_attention import prefill_attention  # noqa: E402
from lmforge.model_inputs import AttnOptions  # noqa: E402

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
HEADS = [(8, 8), (16, 4), (32, 4)]  # GQA ratios 1, 4, 8
HEAD_IDS = ["gqa1", "gqa4", "gqa8"]


def _reference(batch: dict, scale: float, **kwargs) -> torch.Tensor:
    return cpu_backend.paged_attention(
        batch["query"].float(),
        batch["k_cache"].float(),
        batch["v_cache"].float(),
        batch["meta"],
        AttnOptions(scale, **kwargs),
    )


def _decode(batch: dict, scale: float, **kwargs) -> torch.Tensor:
    q, meta = batch["query"], batch["meta"]
    out = torch.full(
        (q.shape[0], q.shape[1], kwargs.get("v_head_dim") or batch["v_cache"].shape[-1]),
        float("nan"),
        dtype=q.dtype,
        device=q.device,
    )
    return decode_attention(
        q, batch["k_cache"], batch["v_cache"], meta.block_tables, meta.kv_seqlens, scale, out=out, **kwargs
    )


def _prefill(batch: dict, scale: float, **kwargs) -> torch.Tensor:
    q, meta = batch["query"], batch["meta"]
    out = torch.full(
        (q.shape[0], q.shape[1], kwargs.get("v_head_dim") or batch["v_cache"].shape[-1]),
        float("nan"),
        dtype=q.dtype,
        device=q.device,
    )
    return prefill_attention(
        q,
        batch["k_cache"],
        batch["v_cache"],
        meta.block_tables,
        meta.q_start_loc,
        meta.q_seqlens,
        meta.kv_seqlens,
        meta.max_q_seqlen,
        scale,
        out=out,
        **kwargs,
    )


def _decode_lens(batch_size: int, block_size: int) -> list[int]:
    # block boundaries (exactly full, one past, one short) plus a few longer, uneven lengths
    lens = [1, block_size, block_size + 1, 3 * block_size - 1, 257, 130, 4 * block_size]
    return (lens * 2)[:batch_size] if batch_size > 1 else [5 * block_size + 3]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("batch_size", [1, 7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_attention(device, check_dtype, paged_batch, tol, dtype, batch_size, block_size, heads, head_dim):
    check_dtype(dtype)
    kv_lens = _decode_lens(batch_size, block_size)
    batch = paged_batch([1] * batch_size, kv_lens, *heads, head_dim, block_size, dtype, device)
    scale = head_dim**-0.5
    torch.testing.assert_close(_decode(batch, scale).float(), _reference(batch, scale), **tol(dtype))


@pytest.mark.parametrize("window,softcap", [(32, None), (100, None), (None, 1.5), (40, 2.0)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_attention_window_softcap(device, check_dtype, paged_batch, tol, dtype, window, softcap):
    check_dtype(dtype)
    batch = paged_batch([1] * 6, [1, 31, 33, 100, 170, 257], 16, 4, 128, 16, dtype, device)
    kwargs = {"sliding_window": window, "logit_softcapping": softcap}
    torch.testing.assert_close(_decode(batch, 0.2, **kwargs).float(), _reference(batch, 0.2, **kwargs), **tol(dtype))


@pytest.mark.parametrize("num_splits", [1, 3, 64])
@pytest.mark.parametrize("min_split_keys", [None, 1])
@pytest.mark.parametrize("fused_reduce", [True, False], ids=["one_launch", "reduce_kernel"])
def test_decode_attention_split_counts(device, paged_batch, tol, num_splits, fused_reduce, min_split_keys):
    """More splits than chunks leaves programs with nothing to do; they must not disturb the combine (in the split
    kernel or in the reduce kernel); min_split_keys 1 splits even short sequences, the default keeps them whole."""
    batch = paged_batch([1] * 4, [7, 64, 200, 700], 8, 2, 64, 16, torch.float16, device)
    kwargs = dict(num_splits=num_splits, fused_reduce=fused_reduce, min_split_keys=min_split_keys)
    out = _decode(batch, 0.125, **kwargs)
    torch.testing.assert_close(out.float(), _reference(batch, 0.125), **tol(torch.float16))


PREFILL_CASES = {
    "prefill": ([37, 100, 5, 64, 129], [37, 100, 5, 64, 129]),
    "chunked": ([1, 17, 5, 40, 130], [30, 17, 100, 73, 200]),  # kv_len > q_len: a cached prefix
}


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("case", sorted(PREFILL_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_attention(device, check_dtype, paged_batch, tol, dtype, case, block_size, heads, head_dim):
    check_dtype(dtype)
    q_lens, kv_lens = PREFILL_CASES[case]
    batch = paged_batch(q_lens, kv_lens, *heads, head_dim, block_size, dtype, device)
    scale = head_dim**-0.5
    torch.testing.assert_close(_prefill(batch, scale).float(), _reference(batch, scale), **tol(dtype))


@pytest.mark.parametrize("window,softcap", [(16, None), (50, None), (None, 1.5), (40, 2.0)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_attention_window_softcap(device, check_dtype, paged_batch, tol, dtype, window, softcap):
    check_dtype(dtype)
    batch = paged_batch([1, 17, 70, 130], [30, 17, 150, 130], 16, 4, 64, 16, dtype, device)
    kwargs = {"sliding_window": window, "logit_softcapping": softcap}
    torch.testing.assert_close(_prefill(batch, 0.2, **kwargs).float(), _reference(batch, 0.2, **kwargs), **tol(dtype))


@pytest.mark.parametrize("head_dim", [80, 96, 256])
def test_attention_other_head_dims(device, paged_batch, tol, head_dim):
    batch = paged_batch([1, 9, 70], [20, 40, 70], 8, 2, head_dim, 16, torch.float16, device)
    scale = head_dim**-0.5
    torch.testing.assert_close(_prefill(batch, scale).float(), _reference(batch, scale), **tol(torch.float16))
    decode = paged_batch([1] * 3, [20, 40, 70], 8, 2, head_dim, 16, torch.float16, device)
    torch.testing.assert_close(_decode(decode, scale).float(), _reference(decode, scale), **tol(torch.float16))


def test_attention_v_head_dim_reads_first_channels(device, paged_batch, tol):
    """MLA keeps one latent cache: v_head_dim < the cache's dim reads the leading channels of v_cache."""
    for q_lens, kv_lens in (([1, 1, 1], [5, 33, 80]), ([3, 20], [10, 20])):
        batch = paged_batch(q_lens, kv_lens, 8, 1, 128, 16, torch.float16, device)
        batch["v_cache"] = batch["k_cache"]
        run = _decode if max(q_lens) == 1 else _prefill
        out = run(batch, 0.1, v_head_dim=64)
        assert out.shape[-1] == 64
        torch.testing.assert_close(out.float(), _reference(batch, 0.1, v_head_dim=64), **tol(torch.float16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backend_paged_attention_dispatch(device, check_dtype, paged_batch, poison_allocator, tol, dtype):
    """The backend op: decode batches take the split-K kernel, anything else the prefill kernel."""
    check_dtype(dtype)
    cases = [([1] * 4, [3, 16, 17, 90], True), ([4, 1, 1], [4, 50, 9], False), ([1, 1], [12, 40], False)]
    for q_lens, kv_lens, is_decoding in cases:
        batch = paged_batch(q_lens, kv_lens, 8, 2, 64, 16, dtype, device, is_decoding=is_decoding)
        poison_allocator()
        out = cuda_backend.OPS["paged_attention"](
            batch["query"], batch["k_cache"], batch["v_cache"], batch["meta"], AttnOptions(0.125)
        )
        torch.testing.assert_close(out.float(), _reference(batch, 0.125), **tol(dtype))


def test_attention_float32(device, paged_batch, tol):
    """float32 models get exact float32 dots, so the kernels match the reference closely (the reference runs
    SDPA's math backend: the fused ones may use tf32 on a GPU)."""
    decode = paged_batch([1] * 4, [9, 16, 40, 77], 8, 2, 64, 16, torch.float32, device)
    batch = paged_batch([5, 33], [20, 33], 8, 2, 64, 16, torch.float32, device)
    with sdpa_kernel(SDPBackend.MATH):
        ref_decode, ref_prefill = _reference(decode, 0.125), _reference(batch, 0.125)
    torch.testing.assert_close(_decode(decode, 0.125), ref_decode, **tol(torch.float32))
    torch.testing.assert_close(_prefill(batch, 0.125), ref_prefill, **tol(torch.float32))


# (head_dim, v_head_dim, heads, kv_heads): DeepSeek-V3's absorbed MLA (576 = 512 latent + 64 rope, values the
# first 512 latent channels) at TP 8 and TP 1 head counts, and a small odd-sized latent
MLA_SHAPES = [(576, 512, 16, 1), (576, 512, 128, 1), (40, 32, 8, 1), (40, 32, 8, 2)]


@pytest.mark.parametrize("shared", [True, False], ids=["shared_cache", "own_v_cache"])
@pytest.mark.parametrize("shape", MLA_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_mla_shapes(device, check_dtype, paged_batch, tol, dtype, shape, shared):
    """Head dims past 256 and not powers of two, values read from the key cache itself (one latent cache)."""
    check_dtype(dtype)
    head_dim, v_dim, heads, kv_heads = shape
    scale = head_dim**-0.5
    for q_lens, kv_lens in (([1] * 3, [5, 33, 80]), ([3, 20, 70], [10, 20, 90])):
        batch = paged_batch(q_lens, kv_lens, heads, kv_heads, head_dim, 16, dtype, device, v_head_dim=v_dim)
        if shared:
            batch["v_cache"] = batch["k_cache"]
        run = _decode if max(q_lens) == 1 else _prefill
        out = run(batch, scale, v_head_dim=v_dim)
        torch.testing.assert_close(out.float(), _reference(batch, scale, v_head_dim=v_dim), **tol(dtype))


def _fill_reference(batch: dict, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The caches after fill_kv_cache (in their own dtype) and the float32 reference attention over them."""
    k_ref, v_ref = batch["k_cache"].clone(), batch["v_cache"].clone()
    cpu_backend.fill_kv_cache(key, value, k_ref, v_ref, batch["meta"].slot_mapping)
    return k_ref, v_ref


@pytest.mark.parametrize("min_split_keys", [None, 1])
@pytest.mark.parametrize("fused_reduce", [True, False], ids=["one_launch", "reduce_kernel"])
@pytest.mark.parametrize("num_splits", [None, 3, 64])
@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_attention_fused_fill(
    device, check_dtype, paged_batch, tol, dtype, heads, head_dim, num_splits, fused_reduce, min_split_keys
):
    """This step's key/value written by the attention kernel itself: the cache ends up as fill_kv_cache leaves it
    (everything else untouched) and the output attends to the new key as if it had been cached first."""
    check_dtype(dtype)
    # a one-key sequence (CUDA-graph padding rows), block and chunk edges, one past the default split size
    kv_lens = [1, 16, 17, 64, 65, 200, 257, 600]
    batch = paged_batch([1] * len(kv_lens), kv_lens, *heads, head_dim, 16, dtype, device)
    meta = batch["meta"]
    key = torch.randn(len(kv_lens), heads[1], head_dim, device=device).to(dtype)
    value = torch.randn_like(key)
    k_ref, v_ref = _fill_reference(batch, key, value)
    scale = head_dim**-0.5
    ref = _reference({**batch, "k_cache": k_ref, "v_cache": v_ref}, scale)
    out = torch.full_like(batch["query"], float("nan"))
    got = decode_attention(
        batch["query"],
        batch["k_cache"],
        batch["v_cache"],
        meta.block_tables,
        meta.kv_seqlens,
        scale,
        out=out,
        num_splits=num_splits,
        key=key,
        value=value,
        slot_mapping=meta.slot_mapping,
        fused_reduce=fused_reduce,
        min_split_keys=min_split_keys,
    )
    assert torch.equal(batch["k_cache"], k_ref) and torch.equal(batch["v_cache"], v_ref)
    torch.testing.assert_close(got.float(), ref, **tol(dtype))


@pytest.mark.parametrize("window,softcap", [(32, None), (None, 1.5), (40, 2.0)])
def test_decode_attention_fused_fill_window_softcap(device, paged_batch, tol, window, softcap):
    batch = paged_batch([1] * 5, [1, 31, 33, 100, 170], 16, 4, 128, 16, torch.float16, device)
    meta = batch["meta"]
    key = torch.randn(5, 4, 128, device=device).half()
    value = torch.randn_like(key)
    k_ref, v_ref = _fill_reference(batch, key, value)
    kwargs = {"sliding_window": window, "logit_softcapping": softcap}
    ref = _reference({**batch, "k_cache": k_ref, "v_cache": v_ref}, 0.2, **kwargs)
    got = decode_attention(
        batch["query"],
        batch["k_cache"],
        batch["v_cache"],
        meta.block_tables,
        meta.kv_seqlens,
        0.2,
        key=key,
        value=value,
        slot_mapping=meta.slot_mapping,
        **kwargs,
    )
    torch.testing.assert_close(got.float(), ref, **tol(torch.float16))


def test_decode_attention_one_launch_counters_reset(device, paged_batch, tol):
    """The in-kernel combine leaves its arrival counters at zero: back-to-back launches (graph replays) agree."""
    batch = paged_batch([1] * 3, [7, 64, 200], 8, 2, 64, 16, torch.float16, device)
    ref = _reference(batch, 0.125)
    for splits in (64, 3, 64):
        out = _decode(batch, 0.125, num_splits=splits, min_split_keys=1)
        torch.testing.assert_close(out.float(), ref, **tol(torch.float16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backend_fill_kv_and_attend(device, check_dtype, paged_batch, poison_allocator, tol, dtype):
    """The backend op against the cpu one (fill, then attend) on decode and prefill batches."""
    check_dtype(dtype)
    cases = [([1] * 4, [3, 16, 17, 90], True), ([4, 1, 1], [4, 50, 9], False)]
    for q_lens, kv_lens, is_decoding in cases:
        batch = paged_batch(q_lens, kv_lens, 8, 2, 64, 16, dtype, device, is_decoding=is_decoding)
        key = torch.randn(sum(q_lens), 2, 64, device=device).to(dtype)
        value = torch.randn_like(key)
        k_ref, v_ref = batch["k_cache"].float(), batch["v_cache"].float()
        ref = cpu_backend.OPS["fill_kv_and_attend"](
            batch["query"].float(), key.float(), value.float(), k_ref, v_ref, batch["meta"], AttnOptions(0.125)
        )
        poison_allocator()
        out = cuda_backend.OPS["fill_kv_and_attend"](
            batch["query"], key, value, batch["k_cache"], batch["v_cache"], batch["meta"], AttnOptions(0.125)
        )
        torch.testing.assert_close(out.float(), ref, **tol(dtype))
        torch.testing.assert_close(batch["k_cache"].float(), k_ref, **tol(dtype))
        torch.testing.assert_close(batch["v_cache"].float(), v_ref, **tol(dtype))


def test_decode_attention_fused_fill_rejects_other_caches(device, paged_batch):
    batch = paged_batch([1] * 2, [5, 9], 8, 2, 64, 16, torch.float16, device)
    meta = batch["meta"]
    key = torch.randn(2, 2, 64, device=device)  # float32 keys for a float16 cache
    with pytest.raises(ValueError, match="plain cache"):
        decode_attention(
            batch["query"],
            batch["k_cache"],
            batch["v_cache"],
            meta.block_tables,
            meta.kv_seqlens,
            0.1,
            key=key,
            value=key,
            slot_mapping=meta.slot_mapping,
        )
