"""rms_norm, apply_rotary and the gated activations of the cuda backend against the cpu reference in float32."""

import pytest
import torch

pytest.importorskip("triton")

from lmforge.backends import cpu as cpu_backend  # noqa: E402
from lmforge.backends import cuda as cuda_backend  # noqa: E402

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [64, 1000, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm(device, check_dtype, poison_allocator, tol, dtype, hidden, with_residual, weight_offset):
    check_dtype(dtype)
    x = torch.randn(3, 11, hidden, device=device).to(dtype)
    weight = (torch.rand(hidden, device=device) + 0.5).to(dtype)
    residual = torch.randn_like(x) if with_residual else None
    x_before = x.clone()
    poison_allocator()
    got = cuda_backend.OPS["rms_norm"](x, weight, 1e-6, residual, weight_offset)
    ref = cpu_backend.rms_norm(
        x.float(), weight.float(), 1e-6, None if residual is None else residual.float(), weight_offset
    )
    if with_residual:
        (got, got_res), (ref, ref_res) = got, ref
        assert torch.equal(got_res, x + residual)  # the same rounding as torch's add in this dtype
        torch.testing.assert_close(got_res.float(), ref_res, **tol(dtype))
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.float(), ref, **tol(dtype))
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("rot_dim", [None, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(8, 8), (32, 8), (12, 2)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_rotary_on_qkv_views(device, check_dtype, tol, dtype, heads, head_dim, rot_dim):
    check_dtype(dtype)
    num_tokens, (num_heads, num_kv_heads) = 29, heads
    rot_dim = rot_dim or head_dim
    sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    qkv = torch.randn(num_tokens, sum(sizes), device=device).to(dtype)
    q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in qkv.split(sizes, dim=-1))
    positions = torch.randint(0, 4096, (num_tokens,), device=device).float()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, device=device).float() / rot_dim))
    freqs = positions[:, None] * inv_freq[None, :]
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    ref_q, ref_k = cpu_backend.apply_rotary(q.float(), k.float(), cos, sin)
    v_before = v.clone()
    got_q, got_k = cuda_backend.OPS["apply_rotary"](q, k, cos, sin)
    torch.testing.assert_close(got_q.float(), ref_q, **tol(dtype))
    torch.testing.assert_close(got_k.float(), ref_k, **tol(dtype))
    assert torch.equal(v, v_before)


@pytest.mark.parametrize("shape", [(7, 2 * 64), (2, 5, 2 * 1000), (33, 2 * 4096)])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_activations(device, check_dtype, poison_allocator, tol, dtype, act, shape):
    check_dtype(dtype)
    x = (torch.randn(shape, device=device) * 2).to(dtype)
    if act == "silu":
        ref = cpu_backend.silu_and_mul(x.float())
        poison_allocator()
        got = cuda_backend.OPS["silu_and_mul"](x, inplace=True)
    else:
        approximate = "tanh" if act == "gelu_tanh" else "none"
        ref = cpu_backend.gelu_and_mul(x.float(), approximate=approximate)
        poison_allocator()
        got = cuda_backend.OPS["gelu_and_mul"](x, approximate=approximate)
    assert got.shape == (*shape[:-1], shape[-1] // 2) and got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, **tol(dtype))


@pytest.mark.parametrize("kind", ["silu", "gelu", "gelu_tanh", "relu", "relu2"])
@pytest.mark.parametrize("d", [64, 1000, 3000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plain_activation(device, check_dtype, poison_allocator, tol, dtype, d, kind):
    check_dtype(dtype)
    x = (torch.randn(5, 3, d, device=device) * 3).to(dtype)
    poison_allocator()
    got = cuda_backend.OPS["activation"](x, kind)
    ref = cpu_backend.activation(x.float(), kind)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.float(), ref, **tol(dtype))
    got_strided = cuda_backend.OPS["activation"](x[..., : d // 2], kind)  # a strided view is read right too
    torch.testing.assert_close(got_strided.float(), ref[..., : d // 2], **tol(dtype))


@pytest.mark.parametrize("scales", [(1.0, 1.0), (4.0, 1.0), (1.0, 1.2)], ids=str)
@pytest.mark.parametrize("rot_dim", [32, 128, 96])
def test_rotary_cos_sin(device, rot_dim, scales):
    position_scale, attention_scaling = scales
    positions = torch.cat((torch.tensor([0, 1, 131071]), torch.randint(0, 40000, (45,)))).to(device)
    inv_freq = (1.0 / (500000 ** (torch.arange(0, rot_dim, 2).double() / rot_dim))).float().to(device)
    got = cuda_backend.OPS["rotary_cos_sin"](positions, inv_freq, position_scale, attention_scaling)
    ref = cpu_backend.OPS["rotary_cos_sin"](positions.cpu(), inv_freq.cpu(), position_scale, attention_scaling)
    for g, r in zip(got, ref, strict=True):
        assert g.shape == (48, rot_dim) and g.dtype == torch.float32
        torch.testing.assert_close(g.cpu(), r, atol=2e-6, rtol=1e-5)
    empty = cuda_backend.OPS["rotary_cos_sin"](positions[:0], inv_freq)
    assert empty[0].shape == (0, rot_dim)
