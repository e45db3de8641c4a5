"""The one-pass exponential-race sampling kernel (kernels/cuda/sampling.py): draws follow softmax(logits / T) per
row (chi-square), -inf logits are never drawn, rows are independent of each other's temperature."""

import pytest
import torch

pytest.importorskip("triton")

from lmforge.kernels.cuda.sampling import race_sample  # noqa: E402

pytestmark = pytest.mark.gpu


# chi-square quantile at p = 1e-4 for k degrees of freedom (Wilson-Hilferty approximation)
def _chi2_limit(k: int, z: float = 3.719) -> float:
    return k * (1 - 2 / (9 * k) + z * (2 / (9 * k)) ** 0.5) ** 3


def _chi2(draws: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    observed = torch.bincount(draws.cpu(), minlength=probs.numel()).double()
    expected = probs.double().cpu() * draws.numel()
    ok = expected >= 5
    return float(((observed[ok] - expected[ok]) ** 2 / expected[ok]).sum()), int(ok.sum()) - 1


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_race_follows_softmax(device, temperature):
    torch.manual_seed(0)
    vocab = 37
    logits = torch.randn(vocab, device=device) * 2
    logits[5] = float("-inf")
    n = 20000 if device.type == "cuda" else 1500
    draws = race_sample(logits.expand(n, vocab).contiguous(), torch.full((n,), temperature, device=device))
    assert draws.dtype == torch.int64 and draws.shape == (n,)
    assert not (draws == 5).any()
    chi, dof = _chi2(draws, torch.softmax(logits / temperature, -1))
    assert chi < _chi2_limit(dof), (chi, dof)


def test_race_rows_use_their_own_temperature(device):
    """Half the rows at T=0.05 (nearly greedy), half at T=5: the cold half picks the argmax, the hot half spreads."""
    torch.manual_seed(1)
    vocab = 1500  # more than one BLOCK of the kernel
    logits = torch.randn(vocab, device=device)
    n = 400
    temps = torch.tensor([0.05, 5.0], device=device).repeat(n // 2)
    params = torch.stack([temps, torch.zeros_like(temps)], 1)  # a strided temperature column, as the sampler has
    draws = race_sample(logits.expand(n, vocab).contiguous(), params[:, 0])
    cold, hot = draws[0::2], draws[1::2]
    assert (cold == logits.argmax()).float().mean() > 0.9
    assert hot.unique().numel() > 50


def test_race_bf16_logits_and_seed(device):
    torch.manual_seed(2)
    logits = torch.randn(8, 3000, device=device).to(torch.bfloat16)
    seed = torch.tensor([1234], device=device)
    a = race_sample(logits, torch.ones(8, device=device), seed)
    b = race_sample(logits, torch.ones(8, device=device), seed)
    assert torch.equal(a, b)  # same seed, same draws
    assert ((a >= 0) & (a < 3000)).all()
