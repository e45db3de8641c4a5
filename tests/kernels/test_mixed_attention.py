"""The cuda backend's paged_attention on mixed batches: leading decode rows go to the decode kernel, the rest to the
prefill kernel (backends/cuda/attention.py `_decode_prefix`); the result matches the cpu reference either way."""

import pytest
import torch

pytest.importorskip("triton")

from lmforge.backends import cpu as cpu_backend  # noqa: E402
from lmforge.backends import cuda as cuda_backend  # noqa: E402
from lmforge.backends.cuda import attention as cuda_attention  # noqa: E402
from lmforge.model_inputs import AttnOptions  # noqa: E402

pytestmark = pytest.mark.gpu


def _reference(batch: dict, options: AttnOptions) -> torch.Tensor:
    return cpu_backend.paged_attention(
        batch["query"].float(), batch["k_cache"].float(), batch["v_cache"].float(), batch["meta"], options
    )


CASES = {
    # 9 decode rows, then prefill chunks and a decode row among them: split at 8 (a multiple of 4)
    "split": ([1] * 9 + [5, 1, 33], [3, 16, 17, 90, 40, 64, 65, 7, 200, 5, 31, 40], 8),
    # 13 leading decode rows: split at 12
    "split12": ([1] * 13 + [20], [3, 16, 17, 90, 40, 64, 65, 7, 200, 5, 31, 40, 2, 20], 12),
    # exactly the minimum at the head
    "min": ([1] * 8 + [17], [2, 30, 19, 64, 100, 3, 8, 77, 17], 8),
    # too few leading decode rows: the prefill kernel takes everything
    "few": ([1] * 7 + [4, 1, 1], [5, 9, 60, 2, 33, 16, 70, 4, 50, 9], 0),
    # 10 leading decode rows and one prefill row: split at 8
    "tail": ([1] * 10 + [3], [5, 9, 60, 2, 33, 16, 70, 4, 50, 9, 3], 8),
    # a prefill row first: no prefix
    "prefill_first": ([6] + [1] * 9, [6, 3, 16, 17, 90, 40, 64, 65, 7, 200], 0),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("window_softcap", [(None, None), (24, 30.0)], ids=["plain", "window_softcap"])
def test_mixed_batch_split(device, paged_batch, poison_allocator, tol, case, window_softcap):
    q_lens, kv_lens, want_split = CASES[case]
    dtype = torch.float16
    batch = paged_batch(q_lens, kv_lens, 8, 2, 64, 16, dtype, device, is_decoding=False)
    window, softcap = window_softcap
    options = AttnOptions(0.125, sliding_window=window, logit_softcapping=softcap)
    poison_allocator()
    out = cuda_backend.OPS["paged_attention"](
        batch["query"], batch["k_cache"], batch["v_cache"], batch["meta"], options
    )
    split, _ = batch["meta"].scratch["decode_prefix"]
    assert split == want_split and split % 4 == 0
    assert out.shape == (sum(q_lens), 8, 64) and out.dtype == dtype
    torch.testing.assert_close(out.float(), _reference(batch, options), **tol(dtype))


def test_mixed_batch_split_matches_unsplit(device, paged_batch, monkeypatch):
    """The split changes which kernel serves a row, not the answer: equal to the all-prefill-kernel result."""
    batch = paged_batch(
        [1] * 12 + [40],
        [9, 16, 40, 77, 3, 64, 65, 128, 5, 30, 31, 2, 60],
        8,
        2,
        64,
        16,
        torch.float16,
        device,
        is_decoding=False,
    )
    args = (batch["query"], batch["k_cache"], batch["v_cache"], batch["meta"], AttnOptions(0.125))
    split = cuda_backend.OPS["paged_attention"](*args)
    batch["meta"].scratch.clear()
    monkeypatch.setattr(cuda_attention, "MIN_DECODE_PREFIX", 10**6)
    whole = cuda_backend.OPS["paged_attention"](*args)
    assert batch["meta"].scratch["decode_prefix"][0] == 0
    torch.testing.assert_close(split, whole, atol=4e-3, rtol=4e-3)
