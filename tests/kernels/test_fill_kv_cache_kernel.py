"""fill_kv_cache kernel against the cpu reference: every slot written exactly, every other slot untouched."""

import pytest
import torch

pytest.importorskip("triton")

from lmforge.backends import cpu as cpu_backend  # noqa: E402
from lmforge.kernels.cuda.fill_kv_cache import fill_kv_cache  # noqa: E402

pytestmark = pytest.mark.gpu


def _caches(num_blocks, block_size, heads, dim, dtype, device, v_dim=None):
    k_cache = torch.randn(num_blocks, block_size, heads, dim, device=device).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, heads, v_dim or dim, device=device).to(dtype)
    return k_cache, v_cache


@pytest.mark.parametrize("head_dim", [64, 128, 96])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fill_kv_cache_from_qkv_views(device, check_dtype, dtype, block_size, head_dim):
    check_dtype(dtype)
    num_tokens, num_heads, num_kv_heads, num_blocks = 37, 8, 2, 12
    # k and v are column slices of one fused qkv output, as the model produces them
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=device).to(dtype)
    _, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    key, value = k.unflatten(-1, (num_kv_heads, head_dim)), v.unflatten(-1, (num_kv_heads, head_dim))
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    k_cache, v_cache = _caches(num_blocks, block_size, num_kv_heads, head_dim, dtype, device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    cpu_backend.fill_kv_cache(key, value, k_ref, v_ref, slots)
    fill_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_fill_kv_cache_without_value_and_padding_slots(device):
    """value=None writes keys only (MLA); slot -1 marks a padding token that must not be written."""
    k_cache, v_cache = _caches(4, 16, 1, 72, torch.float16, device)
    key = torch.randn(5, 1, 72, device=device).half()
    slots = torch.tensor([3, -1, 17, 63, -1], device=device)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    fill_kv_cache(key, None, k_cache, None, slots)
    expected = k_before.view(64, 1, 72).clone()
    expected[slots[slots >= 0]] = key[slots >= 0]
    assert torch.equal(k_cache.view(64, 1, 72), expected)
    assert torch.equal(v_cache, v_before)


def test_fill_kv_cache_casts_to_cache_dtype(device):
    k_cache, v_cache = _caches(2, 16, 2, 64, torch.float16, device, v_dim=32)
    key, value = torch.randn(6, 2, 64, device=device), torch.randn(6, 2, 32, device=device)
    slots = torch.arange(6, device=device) * 5
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    cpu_backend.fill_kv_cache(key, value, k_ref, v_ref, slots)
    fill_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
