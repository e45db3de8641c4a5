"""The CPU temperature-sampling kernel (lmf_sample_temperature in lmforge/kernels/cpu/kernels.c), which the sampler
runs for rows without top-k, top-p or min-p, against the torch draw it replaces (engine/sampler.py's _multinomial:
softmax(logits / t) in float32, its float64 cumulative sums, the first index reaching (1 - u) * total).

The kernel sums exp(l / t - max) (float32 exp, float64 sums) where torch sums softmax's float32 quotients, so the
two cumulative sums differ by a few float32 roundings of each term: for the same u they pick the same token except
where the target lies within that much of a boundary, and the test allows exactly that."""

from __future__ import annotations

import pytest
import torch

from lmforge.kernels import cpu as cpu_kernels


@pytest.fixture(autouse=True)
def _kernels_built():
    if not cpu_kernels.available():
        pytest.fail("the CPU kernels did not build on this machine (a C compiler is part of the test setup)")


def _reference_cdf(logits: torch.Tensor, t: float) -> torch.Tensor:
    """float64 [vocab] cumulative sums of softmax(logits / t), normalised to end at 1."""
    p = torch.softmax((logits / t).double(), dim=-1)
    return p.cumsum(-1)


@pytest.mark.parametrize("vocab", [1, 15, 256, 257, 49152])  # one entry, a partial vector, one block, a block + 1
@pytest.mark.parametrize("t", [0.6, 1.0, 1.7])
def test_sampling_kernel_draws_the_reference_token_for_each_u(vocab, t):
    g = torch.Generator().manual_seed(vocab)
    rows = 8
    logits = torch.randn(rows, vocab, generator=g) * 3
    u = torch.rand(rows, generator=g, dtype=torch.float64)
    u[0] = 0.0  # the largest target: the last token of positive probability
    ids = cpu_kernels.sample_temperature(logits, torch.full((rows,), t), u)
    assert ids.dtype == torch.int64 and ids.shape == (rows,)
    for r in range(rows):
        cdf = _reference_cdf(logits[r], t)
        target = (1.0 - u[r].item()) * cdf[-1].item()
        j = ids[r].item()
        assert 0 <= j < vocab
        # float32 rounding of each term (~6e-8 relative), summed over the vocabulary
        eps = 4 * vocab * 6e-8
        below = cdf[j - 1].item() if j > 0 else 0.0
        assert below <= target + eps and cdf[j].item() >= target - eps, (r, j, below, cdf[j].item(), target)


def test_sampling_kernel_frequencies_follow_the_probabilities():
    """u on an even grid: each token's share of the draws is its probability, to 1 / draws (+ rounding)."""
    g = torch.Generator().manual_seed(0)
    vocab, draws, t = 40, 4000, 0.8
    logits = torch.randn(vocab, generator=g) * 2
    u = (torch.arange(draws, dtype=torch.float64) + 0.5) / draws
    ids = cpu_kernels.sample_temperature(logits.expand(draws, vocab), torch.full((draws,), t), u)
    counts = torch.bincount(ids, minlength=vocab).double() / draws
    p = torch.softmax(logits.double() / t, dim=-1)
    assert (counts - p).abs().max().item() <= 1.0 / draws + 1e-9


def test_sampling_kernel_never_draws_a_masked_entry_and_reads_strided_rows():
    g = torch.Generator().manual_seed(1)
    padded = torch.randn(6, 300, generator=g)
    logits = padded[:, :257]  # rows 300 apart, as the engine's padded-vocabulary logits
    logits[:, ::2] = float("-inf")
    logits[3, :] = float("-inf")
    logits[3, 100] = 5.0  # one entry left
    u = torch.tensor([0.0, 0.25, 0.5, 0.75, 0.999999, 0.3], dtype=torch.float64)
    ids = cpu_kernels.sample_temperature(logits, torch.full((6,), 0.7), u)
    assert all(i % 2 == 1 for i in ids.tolist() if i != 100)
    assert ids[3].item() == 100
    for r in (0, 1, 2, 4, 5):
        cdf = _reference_cdf(logits[r], 0.7)
        j = ids[r].item()
        target = 1.0 - u[r].item()
        assert (cdf[j - 1].item() if j else 0.0) <= target + 1e-5 and cdf[j].item() >= target - 1e-5


def test_sampling_kernel_leaves_nan_inf_and_empty_rows_to_the_caller():
    logits = torch.zeros(4, 64)
    logits[0, 3] = float("nan")
    logits[1, 7] = float("inf")
    logits[2, :] = float("-inf")
    ids = cpu_kernels.sample_temperature(logits, torch.ones(4), torch.full((4,), 0.5, dtype=torch.float64))
    assert ids[:3].tolist() == [-1, -1, -1]
    assert 0 <= ids[3].item() < 64


def test_sampler_kernel_path_falls_back_per_row_for_nan_rows():
    """A batch where one row has a NaN: that row gets the torch draw's own fallback (the argmax of its probabilities
    with NaN read as -1), the others the kernel's draw, and the sampler returns one id per row."""
    from lmforge import GenerationConfig
    from lmforge.engine.sampler import Sampler, _multinomial

    sampler = Sampler(64, torch.device("cpu"))

    class Seq:
        def __init__(self):
            self.gen_config = GenerationConfig(do_sample=True, temperature=0.6, top_p=1.0, top_k=0)
            self.generator, self.guide, self.token_ids, self.num_prompt_tokens = None, None, [1], 1
            self.num_new_tokens, self.stop_ids = 0, []
            self.sampling = sampler.row_info(self.gen_config)

    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    logits[1, 5] = float("nan")
    logits[1, 9] = 50.0
    out = sampler(logits, [Seq(), Seq(), Seq()])
    torch_draw = _multinomial((logits[1:2] / 0.6).softmax(-1), torch.full((1, 1), 0.5, dtype=torch.float64))
    assert out.token_ids.shape == (3,) and out.token_ids[1].item() == torch_draw.item()
    assert all(0 <= i < 64 for i in out.token_ids.tolist())
