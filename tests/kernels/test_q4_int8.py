"""The int8-activation int4 linear (lmforge/kernels/cpu/q4_int8.c), which q4_linear runs from Q8_MIN_ROWS rows on for
GGUF weights when LMFORGE_CPU_INT8_ACTIVATIONS=1, against torch references: exactly what it computes (x rounded to
int8 per 32-value block, d = max|x| / 127, times the dequantized weight) to float32 rounding; and the float32
dequantized reference, within the bound that rounding x allows (half a step per value: |err| <= sum_j |w_j| * d_j
/ 2)."""

from __future__ import annotations

import pytest
import torch

from lmforge.kernels import cpu as cpu_kernels
from lmforge.nn.quant.packing import pack_int32

from .q4_weights import random_q4


@pytest.fixture(autouse=True)
def _kernels_built():
    if not cpu_kernels.available():
        pytest.fail("the CPU kernels did not build on this machine (a C compiler is part of the test setup)")
    if not cpu_kernels.library().lmf_q8_available():
        pytest.skip("no int8 path in this build (no vector extension)")


def _weight(k: int, n: int, bits: int, half: bool, seed: int):
    """random_q4 with int8 activations: one plane (8-bit codes for bits 8), codes / scales / mins as [N, K]."""
    prepared, codes, scales, mins = random_q4(k, n, bits, half, seed, int8_activations=True)
    assert prepared["planes"] == 1
    return prepared, codes, scales, mins


def _quantized(x: torch.Tensor):
    """x [M, K] -> its int8 values times their block's step (as the kernel rounds them) and the steps [M, K]."""
    blocks = x.view(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))  # float32, as in C
    q = torch.round(blocks * inv).clamp(-127, 127)
    step = (amax / 127.0).expand_as(blocks)
    return (q * step).view_as(x), step.reshape(x.shape)


@pytest.mark.parametrize("k", [64, 512, 576, 1536])  # a pair only, a full group only, both, three groups
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("rows", [4, 7, 32])
def test_int8_linear_against_its_quantized_reference_and_the_float32_one(k, bits, half, rows, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "Q8_MIN_ROWS", 4)
    n = 37  # not a multiple of the 12-row tile or the 3-row register tile
    prepared, codes, scales, mins = _weight(k, n, bits, half, seed=k + rows + bits)
    g = torch.Generator().manual_seed(rows)
    x, bias = torch.randn(rows, k, generator=g) * 3, torch.randn(n, generator=g)
    x[:, 5] = 40.0  # an outlier channel: its block gets a coarse step (0.31), the others do not
    x[-1, 32:64] = 0.0  # an all-zero block: step 0
    y = cpu_kernels.q4_linear(x, prepared, bias)
    xq, step = _quantized(x)
    w = (codes * scales + mins).double()  # [N, K]
    expected = (xq.double() @ w.t() + bias.double()).float()
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)  # float32 sums of up to 1536 terms
    exact = x.double() @ w.t() + bias.double()
    bound = (step.double() / 2) @ w.abs().t() + 1e-4
    err = (y.double() - exact).abs()
    assert (err <= bound).all(), f"max error {err.max():.3g} over a bound of {bound[err > bound].min():.3g}"
    assert err.max() > 1e-3  # it did take the int8 path (the float32 one is exact to ~1e-5 here)


def test_fewer_rows_an_odd_block_count_or_a_w4a16_weight_stay_exact(monkeypatch):
    """Below Q8_MIN_ROWS (the batch-1 kernel included), for K % 64 != 0 and for weights prepared without
    int8_activations (the W4A16 formats) the float32 kernels run."""
    monkeypatch.setattr(cpu_kernels, "Q8_MIN_ROWS", 4)
    g = torch.Generator().manual_seed(0)
    for k, rows in [(576, 1), (576, 3), (96, 8)]:
        prepared, codes, scales, mins = _weight(k, 40, 4, True, seed=rows)
        x = torch.randn(rows, k, generator=g)
        w = (codes * scales + mins).double()
        err = (cpu_kernels.q4_linear(x, prepared).double() - x.double() @ w.t()).abs()
        # float32 rounding of a K-term sum in any order: a few eps of sum |x_j w_j|, here ~1e-4; an int8-rounded x
        # or a wrong code is off by 1e-2 and more
        bound = 1e-6 * (x.double().abs() @ w.abs().t()) + 1e-6
        assert (err <= bound).all(), f"k={k} rows={rows}: max error {err.max():.3g}, bound {bound.min():.3g}"
    prepared, codes, scales, mins = _weight(576, 40, 4, True, seed=0)
    x = torch.randn(16, 576, generator=g)
    x[:, 0] = 40.0  # a coarse step for the first block
    expected = x @ (codes * scales + mins).t()
    assert (cpu_kernels.q4_linear(x, prepared) - expected).abs().max() > 1e-3  # int8
    exact = cpu_kernels.q4_linear(x, {**prepared, "q4_int8": False})
    torch.testing.assert_close(exact, expected, rtol=1e-5, atol=1e-4)  # outputs of ~40: float32 sums in another order


def test_int8_activations_are_opt_in_and_for_gguf_weights_only(monkeypatch):
    from lmforge.backends.cpu.quant import wna16_prepare

    codes = torch.randint(0, 16, (128, 8), dtype=torch.int32)
    scales, offsets = torch.rand(4, 8) * 0.1, torch.randn(4, 8) * 0.1
    args = dict(qweight=pack_int32(codes, 4, 0), scales=scales, bits=4, group_size=32, compute_dtype=torch.bfloat16)
    monkeypatch.delenv(cpu_kernels.INT8_ACTIVATIONS_ENV, raising=False)
    assert not wna16_prepare(**args, zeros=None, mins=offsets)["q4_int8"]
    monkeypatch.setenv(cpu_kernels.INT8_ACTIVATIONS_ENV, "1")
    assert wna16_prepare(**args, zeros=None, mins=offsets)["q4_int8"]  # GGUF's w = q * s + m
    gptq = wna16_prepare(**{**args, "compute_dtype": None}, zeros=offsets.round().clamp(0, 15), mins=None)
    assert "q4" in gptq and not gptq["q4_int8"]  # W4A16: w = (q - z) * s keeps float32 activations
