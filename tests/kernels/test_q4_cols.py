"""The column-layout int4 linear (lmf_q4_linear_cols in lmforge/kernels/cpu/kernels.c, AVX-512 builds), which
q4_linear runs for Q4_COLS_MIN_ROWS <= rows < Q4_COLS_MAX_ROWS, against the float64 product with the dequantized
weight: float32 products summed in float32 along K, so within K float32 roundings of sum_j |x_j * w_j|. Builds
without AVX-512 have no column layout and run the row kernels (the same bound holds)."""

from __future__ import annotations

import pytest
import torch

from lmforge.kernels import cpu as cpu_kernels

from .q4_weights import random_q4


@pytest.fixture(autouse=True)
def _kernels_built():
    if not cpu_kernels.available():
        pytest.fail("the CPU kernels did not build on this machine (a C compiler is part of the test setup)")


def _prepared(k: int, n: int, bits: int, half: bool, seed: int) -> dict:
    return random_q4(k, n, bits, half, seed)[0]


@pytest.mark.parametrize("k, n", [(32, 32), (576, 96), (1536, 64)])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("rows", [5, 12, 13, 31, 64, 255])  # register blocks of 12 rows: whole, partial, several
def test_q4_cols_kernel_against_the_dequantized_weight(k, n, bits, half, rows):
    prepared = _prepared(k, n, bits, half, seed=k + n + rows)
    assert ("q4_cols" in prepared) == bool(cpu_kernels.library().lmf_q4_cols_available())
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g)
    bias = torch.randn(n, generator=g)
    y = cpu_kernels.q4_linear(x, prepared, bias)
    w = cpu_kernels.q4_dequantize(prepared).double()
    ref = x.double() @ w.t() + bias.double()
    bound = (x.double().abs() @ w.abs().t() + bias.double().abs()) * (k + 2) * 2.0**-24
    assert y.shape == (rows, n)
    assert ((y.double() - ref).abs() <= bound).all(), (y.double() - ref).abs().max().item()


def test_q4_cols_kernel_writes_strided_rows_of_a_3d_input():
    """[B, T, K] input (a reshape to rows), no bias: the same values as row by row."""
    prepared = _prepared(576, 64, 4, True, seed=3)
    x = torch.randn(2, 9, 576, generator=torch.Generator().manual_seed(4))
    y = cpu_kernels.q4_linear(x, prepared)
    assert y.shape == (2, 9, 64)
    w = cpu_kernels.q4_dequantize(prepared).double()
    ref = x.double() @ w.t()
    bound = (x.double().abs() @ w.abs().t()) * 578 * 2.0**-24
    assert ((y.double() - ref).abs() <= bound).all()


def test_q4_cols_layout_is_skipped_where_the_tile_does_not_fit():
    """N not a multiple of 32: no column layout, the row kernels run (and agree with the reference)."""
    prepared = _prepared(64, 40, 4, False, seed=5)
    assert "q4_cols" not in prepared
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(6))
    w = cpu_kernels.q4_dequantize(prepared).double()
    torch.testing.assert_close(cpu_kernels.q4_linear(x, prepared).double(), x.double() @ w.t(), rtol=1e-5, atol=1e-4)
