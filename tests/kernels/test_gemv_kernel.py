"""The M=1 GEMV kernel against float32 torch.nn.functional.linear: every tile configuration, ragged N and K, bias."""

import pytest
import torch

pytest.importorskip("triton")

from lmforge.kernels.cuda.gemv import gemv  # noqa: E402

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
CONFIGS = [None, (2, 1024, 4, 3), (4, 512, 4, 3), (16, 256, 8, 3)]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("shape", [(48, 64), (37, 100), (130, 2048), (3072, 2048), (2048, 8192)], ids=str)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_matches_linear(device, check_dtype, poison_allocator, dtype, bias, shape, config):
    check_dtype(dtype)
    n, k = shape
    if not torch.cuda.is_available() and n * k > 300_000:
        pytest.skip("large shapes are slow in the interpreter")
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    x = torch.randn(1, k, device=device).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    poison_allocator()
    got = gemv(x, w, b, config)
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.shape == (1, n) and got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)


def test_gemv_strided_weight_rows_and_1d_input(device):
    w = torch.randn(40, 96, device=device)[:, :64]  # row stride 96: a column slice of a wider matrix
    w = w.half()
    x = torch.randn(64, device=device).half()
    got = gemv(x, w)
    assert got.shape == (40,)
    torch.testing.assert_close(got.float(), w.float() @ x.float(), atol=2e-2, rtol=2e-2)


def test_gemv_rejects_bad_shapes(device):
    w = torch.randn(8, 16, device=device).half()
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.randn(2, 16, device=device).half(), w)
    with pytest.raises(ValueError, match="contiguous"):
        gemv(torch.randn(1, 8, device=device).half(), w.t())
    with pytest.raises(ValueError, match="bias"):
        gemv(torch.randn(1, 16, device=device).half(), w, torch.zeros(4, device=device).half())
