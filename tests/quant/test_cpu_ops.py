"""The CPU reference ops of QUANT_CONTRACT.md against the formats' own code: bit layouts (AutoAWQ's packer,
compressed-tensors' packer) and activation quantization (compressed-tensors' fake_quantize)."""

from __future__ import annotations

import pytest
import torch

from lmforge.backends.registry import get_op
from lmforge.nn.quant.packing import awq_pack, awq_unpack, pack_int32, unpack_int32
from tests.quant.reference_libs import awq_gemm


@pytest.mark.parametrize("bits, dim", [(4, 0), (4, 1), (8, 0), (8, 1)])
def test_pack_roundtrip_and_compressed_tensors_layout(bits, dim):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    values = torch.randint(0, 2**bits, (16, 32), dtype=torch.int32)
    packed = pack_int32(values, bits, dim)
    assert torch.equal(unpack_int32(packed, bits, dim), values)
    # compressed-tensors packs signed values with a +2**(bits-1) offset: the same words
    theirs = pack_to_int32((values - 2 ** (bits - 1)).to(torch.int8), bits, packed_dim=dim)
    assert torch.equal(packed, theirs)


def test_awq_layout_is_autoawqs():
    gemm = awq_gemm()
    k, n, g = 64, 32, 32
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    zeros = torch.randint(0, 16, (k // g, n)).float()
    scales = torch.rand(k // g, n).half().float() + 0.5
    lin = torch.nn.Linear(k, n, bias=False)
    lin.weight.data = (q.float() - zeros.repeat_interleave(g, 0).t()) * scales.repeat_interleave(g, 0).t()
    packed = gemm.WQLinear_GEMM.from_linear(lin, 4, g, scales=scales, zeros=zeros)
    assert torch.equal(awq_unpack(packed.qweight), q.t())
    assert torch.equal(awq_pack(q.t()), packed.qweight)
    assert torch.equal(awq_unpack(packed.qzeros).float(), zeros)


@pytest.mark.parametrize("bits, group", [(4, 16), (4, 64), (8, 32)])
def test_wna16_matches_the_contract_formula(bits, group):
    k, n = 64, 24
    q = torch.randint(0, 2**bits, (k, n), dtype=torch.int32)
    scales, zeros = torch.rand(k // group, n) + 0.1, torch.randint(0, 2**bits, (k // group, n)).float()
    w_t = (q.float() - zeros.repeat_interleave(group, 0)) * scales.repeat_interleave(group, 0)  # W^T [K, N]
    prepared = get_op("wna16_prepare", "cpu")(pack_int32(q, bits, 0), scales, zeros, bits, group)
    x, bias = torch.randn(5, k), torch.randn(n)
    expected = x @ w_t + bias
    # float32 sums in another order (the CPU kernel's blocks of 32): 1e-5 of the output's scale, not of each value
    atol = 1e-5 * expected.abs().max().item()
    torch.testing.assert_close(get_op("wna16_linear", "cpu")(x, prepared, bias), expected, rtol=0, atol=atol)


def _ct_args(kind: str, strategy: str, symmetric: bool = True, dynamic: bool = False):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type=kind, strategy=strategy, symmetric=symmetric, dynamic=dynamic)


def test_static_fp8_activation_is_compressed_tensors_fake_quantize():
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    from lmforge.backends.cpu.quant import quantize_fp8_activation

    x, scale = torch.randn(7, 48) * 3, torch.tensor([0.011])
    q, s = quantize_fp8_activation(x, scale)
    theirs = fake_quantize(x, scale, torch.zeros(1, dtype=torch.float8_e4m3fn), _ct_args("float", "tensor"))
    torch.testing.assert_close(q.float() * s, theirs, rtol=0, atol=0)


def test_static_asymmetric_int8_activation_is_compressed_tensors_fake_quantize():
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    from lmforge.backends.cpu.quant import quantize_int8_activation

    x, scale, zp = torch.randn(7, 48) * 3 + 1, torch.tensor([0.03]), torch.tensor([-9], dtype=torch.int8)
    q, s, z = quantize_int8_activation(x, scale, zp)
    theirs = fake_quantize(x, scale, zp, _ct_args("int", "tensor", symmetric=False))
    torch.testing.assert_close((q.float() - z) * s, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("static", [False, True])
def test_int8_linear_is_exact_integer_arithmetic(static):
    n, k = 16, 96
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    w_scale = torch.rand(n, 1) * 0.01
    x = torch.randn(4, k)
    in_scale = torch.tensor([0.02]) if static else None
    prepared = get_op("int8_prepare", "cpu")(w, w_scale, in_scale, None)
    y = get_op("int8_linear", "cpu")(x, prepared, None)
    sx = in_scale.reshape(1, 1) if static else x.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(x / sx).clamp(-128, 127)
    expected = (xq.long() @ w.long().t()).double() * sx.double() * w_scale.double().t()
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6)


def test_block_fp8_dequantize_expands_partial_blocks():
    w = torch.randn(40, 24).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 2)  # blocks of 16 x 16 over 40 x 24: partial last blocks
    full = get_op("fp8_dequantize", "cpu")(w, scale, (16, 16))
    for i, j in [(0, 0), (39, 23), (17, 15), (32, 16)]:
        assert full[i, j] == w[i, j].float() * scale[i // 16, j // 16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, k, group", [(48, 64, 32), (64, 256, 128), (32, 64, 64)])
def test_wna16_int4_fast_paths_agree_with_the_reference(n, k, group, dtype, cpu_kernel_mode):
    """float32 (AWQ/GPTQ scales in a float32 model): lmforge's q4 kernel, or torch's int4 kernel without it;
    bfloat16: torch's int4 kernel."""
    q = torch.randint(0, 16, (k, n), dtype=torch.int32)
    scales = (torch.rand(k // group, n) * 0.02 + 0.001).to(dtype)
    zeros = torch.randint(0, 16, (k // group, n)).to(dtype)
    args = (pack_int32(q, 4, 0), scales, zeros, 4, group)
    fast, ref = get_op("wna16_prepare", "cpu")(*args), get_op("wna16_prepare", "cpu")(*args, reference=True)
    fast_key = "q4" if dtype == torch.float32 and cpu_kernel_mode == "kernels" else "int4pack"
    assert fast_key in fast and "weight" in ref
    x, bias = torch.randn(3, k).to(dtype), torch.randn(n).to(dtype)
    linear = get_op("wna16_linear", "cpu")
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(linear(x, fast, bias).float(), linear(x, ref, bias).float(), **tol)


@pytest.mark.parametrize("static_zp", [False, True])
def test_int8_int_mm_fast_path_is_the_reference(static_zp):
    w = torch.randint(-127, 128, (32, 80), dtype=torch.int8)
    scale, x = torch.rand(32, 1) * 0.01, torch.randn(9, 80)
    extra = (torch.tensor([0.02]), torch.tensor([3.0])) if static_zp else (None, None)
    fast = get_op("int8_prepare", "cpu")(w, scale, *extra)
    ref = get_op("int8_prepare", "cpu")(w, scale, *extra, reference=True)
    assert fast["int_mm"] and not ref["int_mm"]
    linear = get_op("int8_linear", "cpu")
    assert torch.equal(linear(x, fast), linear(x, ref))
