"""The row-wise argmax kernel (the greedy token) against torch.argmax: ties, -inf rows, strided rows, many chunks."""

import pytest
import torch

pytest.importorskip("triton")

from lmforge.backends import cuda as cuda_backend  # noqa: E402
from lmforge.kernels.cuda.argmax import argmax_rows  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("shape", [(1, 49152), (1, 128256), (3, 5000), (7, 4096), (1, 100), (16, 12289)], ids=str)
def test_argmax_rows_matches_torch(device, shape):
    rows, n = shape
    x = torch.randn(rows, n, device=device)
    x[0, n // 2] = x[0, n - 1] = 50.0  # a tie across chunks: the first index wins
    if rows > 1:
        x[1] = float("-inf")  # a fully masked row: index 0, as torch gives
    if rows > 2:
        x[2, : n // 3] = 7.0  # a tie inside a chunk
    for _ in range(2):  # the arrival counters are back at zero for the next launch
        got = argmax_rows(x)
        assert got.dtype == torch.int64 and torch.equal(got, x.argmax(dim=-1))


def test_argmax_rows_strided_and_bf16(device, check_dtype):
    x = torch.randn(4, 9000, device=device)[:, :8000]  # padded vocab columns sliced off
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    check_dtype(torch.bfloat16)
    y = torch.randn(2, 6000, device=device).bfloat16()
    assert torch.equal(cuda_backend.OPS["argmax_rows"](y), y.argmax(dim=-1))


def test_argmax_rows_rejects_bad_shapes(device):
    with pytest.raises(ValueError, match="rows, n"):
        argmax_rows(torch.zeros(3, device=device))
