"""Sampler: filters never leak, frequencies follow softmax(logits / T), seeds are batch-independent."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from lmforge.engine.sampler import Sampler
from lmforge.messages import GenerationConfig

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@dataclass
class FakeSeq:
    gen_config: GenerationConfig
    generator: torch.Generator | None = None
    token_ids: list[int] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_new_tokens: int = 0
    stop_ids: list[int] = field(default_factory=list)
    guide: object | None = None


class SpyGuide:
    """Records the row it is handed (penalised and masked, before temperature) and optionally restricts it."""

    def __init__(self, allowed: list[int] | None = None):
        self.allowed = allowed
        self.seen: torch.Tensor | None = None

    def fill_mask(self, logits_row: torch.Tensor) -> None:
        self.seen = logits_row.clone()
        if self.allowed is not None:
            keep = torch.zeros_like(logits_row, dtype=torch.bool)
            keep[self.allowed] = True
            logits_row.masked_fill_(~keep, float("-inf"))


def sample(cfg: GenerationConfig, logits: torch.Tensor, num_draws: int, device: str = "cpu") -> torch.Tensor:
    """num_draws independent draws from one logits row: the row repeated as a batch of unseeded seqs."""
    batch = logits.to(device).expand(num_draws, -1).contiguous()
    return Sampler(logits.numel(), torch.device(device))(batch, [FakeSeq(cfg)] * num_draws).token_ids.cpu()


def chi_square(draws: torch.Tensor, probs: torch.Tensor) -> float:
    observed = torch.bincount(draws, minlength=probs.numel()).double()
    expected = probs.double() * draws.numel()
    support = expected > 0
    assert observed[~support].sum() == 0, "sampled a token of probability 0"
    return float(((observed[support] - expected[support]) ** 2 / expected[support]).sum())


logit_rows = st.lists(st.floats(-8.0, 8.0, width=32), min_size=2, max_size=40).map(torch.tensor)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None)
@given(
    logits=st.lists(st.lists(st.floats(-8.0, 8.0, width=32), min_size=12, max_size=12), min_size=1, max_size=6),
    cfg=st.sampled_from(
        [
            GenerationConfig(),
            GenerationConfig(do_sample=True, top_k=1, temperature=2.0),
            GenerationConfig(do_sample=True, temperature=0.0, top_p=0.3),
        ]
    ),
)
def test_greedy_is_argmax(device, logits, cfg):
    batch = torch.tensor(logits, device=device)
    out = Sampler(12, torch.device(device))(batch, [FakeSeq(cfg) for _ in logits])
    assert torch.equal(out.token_ids.cpu(), batch.argmax(-1).cpu())
    assert out.logprobs is None and out.top_ids is None


@settings(max_examples=30, deadline=None)
@given(logits=logit_rows, top_k=st.integers(1, 45), temperature=st.floats(0.1, 3.0))
def test_top_k_never_leaves_top_k_set(logits, top_k, temperature):
    cfg = GenerationConfig(do_sample=True, top_k=top_k, temperature=temperature)
    draws = sample(cfg, logits, 500)
    kth = logits.topk(min(top_k, logits.numel())).values[-1]
    assert bool((logits[draws] >= kth).all())


@settings(max_examples=30, deadline=None)
@given(logits=logit_rows, top_p=st.floats(0.01, 1.0), temperature=st.floats(0.2, 3.0))
def test_top_p_never_leaves_nucleus(logits, top_p, temperature):
    cfg = GenerationConfig(do_sample=True, top_p=top_p, temperature=temperature)
    draws = sample(cfg, logits, 500)
    probs = (logits.double() / temperature).softmax(-1)
    # A token may be drawn if the tokens strictly more likely hold < top_p mass (ties may go either way).
    mass_above = ((probs[None, :] > probs[:, None] * (1 + 1e-6)) * probs[None, :]).sum(-1)
    nucleus = set(torch.nonzero(mass_above < top_p + 1e-5)[:, 0].tolist())
    assert set(draws.tolist()) <= nucleus


@settings(max_examples=30, deadline=None)
@given(logits=logit_rows, min_p=st.floats(0.0, 1.0), temperature=st.floats(0.2, 3.0))
def test_min_p_never_samples_below_threshold(logits, min_p, temperature):
    cfg = GenerationConfig(do_sample=True, min_p=min_p, temperature=temperature)
    draws = sample(cfg, logits, 500)
    probs = (logits.double() / temperature).softmax(-1)
    assert bool((probs[draws] >= min_p * probs.max() - 1e-6).all())


@pytest.mark.parametrize("min_k", [0, 1])  # with a top-k on every row, top-p runs on the top max-k candidates only
def test_top_k_top_p_match_hf_warpers(min_k):
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 3
    top_ks = torch.randint(min_k, 12, (64,)).tolist()
    top_ps = (torch.rand(64) * 0.9 + 0.05).tolist()
    seqs = [FakeSeq(GenerationConfig(do_sample=True, top_k=k, top_p=p)) for k, p in zip(top_ks, top_ps, strict=True)]
    for _ in range(20):
        draws = Sampler(50, torch.device("cpu"))(logits, seqs).token_ids
        for row, (k, p) in enumerate(zip(top_ks, top_ps, strict=True)):
            ref = logits[row : row + 1]
            if k:
                ref = TopKLogitsWarper(k)(None, ref)
            ref = TopPLogitsWarper(p)(None, ref)
            assert torch.isfinite(ref[0, draws[row]]), (row, k, p)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "cfg",
    [
        GenerationConfig(do_sample=True, temperature=0.7),
        GenerationConfig(do_sample=True, temperature=1.5, top_k=4),
        GenerationConfig(do_sample=True, temperature=1.0, top_p=0.8),
        GenerationConfig(do_sample=True, temperature=1.0, min_p=0.2),
        GenerationConfig(do_sample=True, temperature=1.2, top_k=5, top_p=0.7, min_p=0.3),
    ],
)
def test_frequencies_follow_filtered_softmax(device, cfg):
    torch.manual_seed(1)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    probs = (logits.double() / cfg.temperature).softmax(-1)
    if cfg.top_k:
        probs[cfg.top_k :] = 0  # logits are sorted, so the top-k are the first k
    if cfg.top_p < 1.0:
        mass_before = probs.cumsum(-1) - probs
        probs[mass_before >= cfg.top_p] = 0
    if cfg.min_p:
        probs[probs < cfg.min_p * probs.max()] = 0
    probs /= probs.sum()
    draws = sample(cfg, logits, 40_000, device)
    # df <= 7; the 99.99% quantile of chi2(7) is 29.9, so a correct sampler fails once in 10,000 seeds.
    assert chi_square(draws, probs) < 29.9


def test_seeded_draws_follow_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    seq = FakeSeq(GenerationConfig(do_sample=True, temperature=1.0), generator=torch.Generator().manual_seed(5))
    sampler = Sampler(4, torch.device("cpu"))
    draws = torch.cat([sampler(logits, [seq]).token_ids for _ in range(4000)])
    assert chi_square(draws, logits[0].double().softmax(-1)) < 21.1  # 99.99% quantile of chi2(3)


def _run_seeded(device: str, neighbours: list[GenerationConfig], position: int, steps: int = 25) -> list[int]:
    torch.manual_seed(len(neighbours) * 7 + position)  # the unseeded neighbours' noise differs between runs
    cfg = GenerationConfig(do_sample=True, temperature=1.3, top_p=0.95, random_seed=1234)
    target = FakeSeq(cfg, generator=torch.Generator(device).manual_seed(cfg.random_seed))
    others = [
        FakeSeq(c, generator=torch.Generator(device).manual_seed(99) if c.random_seed else None) for c in neighbours
    ]
    seqs = others[:position] + [target] + others[position:]
    sampler = Sampler(300, torch.device(device))
    gen = torch.Generator().manual_seed(0)
    tokens = []
    for _ in range(steps):
        row_logits = torch.randn(300, generator=gen) * 2  # the target's logits: the same in every run
        batch = torch.randn(len(seqs), 300) * 2
        batch[position] = row_logits
        tokens.append(int(sampler(batch.to(device), seqs).token_ids[position]))
    return tokens


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_tokens_whatever_the_batch(device):
    alone = _run_seeded(device, [], 0)
    neighbours = [
        GenerationConfig(),
        GenerationConfig(do_sample=True, top_k=5, min_p=0.1),
        GenerationConfig(do_sample=True, temperature=0.5, random_seed=7),
        GenerationConfig(do_sample=True, repetition_penalty=1.3, logprobs=3),
    ]
    assert _run_seeded(device, neighbours, 2) == alone
    assert _run_seeded(device, neighbours[:2], 1) == alone
    assert len(set(alone)) > 5  # it really sampled


def test_repetition_penalty_matches_hf():
    torch.manual_seed(2)
    logits = torch.randn(3, 20) * 4
    histories = [[1, 2, 2, 5, 19], [0, 7], [3, 4, 4, 4]]
    penalties = [1.3, 0.7, 1.0]
    guides = [SpyGuide() for _ in histories]
    seqs = [
        FakeSeq(
            GenerationConfig(repetition_penalty=p), token_ids=h, num_prompt_tokens=1, num_new_tokens=len(h) - 1, guide=g
        )
        for h, p, g in zip(histories, penalties, guides, strict=True)
    ]
    Sampler(20, torch.device("cpu"))(logits, seqs)
    for row, (h, p, g) in enumerate(zip(histories, penalties, guides, strict=True)):
        ref = RepetitionPenaltyLogitsProcessor(p)(torch.tensor([h]), logits[row : row + 1].clone())[0]
        torch.testing.assert_close(g.seen, ref)
        hand = logits[row].clone()
        for t in set(h):
            hand[t] = hand[t] / p if hand[t] > 0 else hand[t] * p
        torch.testing.assert_close(g.seen, hand)


def test_presence_frequency_penalties_by_hand():
    logits = torch.zeros(2, 8)
    guides = [SpyGuide(), SpyGuide()]
    # prompt tokens (the first two) are not penalised by the OpenAI penalties
    seqs = [
        FakeSeq(
            GenerationConfig(presence_penalty=0.5, frequency_penalty=0.25),
            token_ids=[6, 7, 1, 1, 1, 3],
            num_prompt_tokens=2,
            num_new_tokens=4,
            guide=guides[0],
        ),
        FakeSeq(GenerationConfig(), token_ids=[1, 1, 2], num_prompt_tokens=1, num_new_tokens=2, guide=guides[1]),
    ]
    Sampler(8, torch.device("cpu"))(logits, seqs)
    expected = torch.zeros(8)
    expected[1] = -(0.5 + 3 * 0.25)
    expected[3] = -(0.5 + 1 * 0.25)
    torch.testing.assert_close(guides[0].seen, expected)
    torch.testing.assert_close(guides[1].seen, torch.zeros(8))


def test_all_penalties_together():
    torch.manual_seed(5)
    logits = torch.randn(2, 16) * 3
    guides = [SpyGuide(), SpyGuide()]
    cfg = GenerationConfig(repetition_penalty=1.5, presence_penalty=-0.5, frequency_penalty=1.0)
    histories = [[3, 4, 5, 5, 9, 9, 9, 3], [15, 0]]
    seqs = [
        FakeSeq(cfg, token_ids=h, num_prompt_tokens=3, num_new_tokens=len(h) - 3, guide=g)
        for h, g in zip(histories, guides, strict=True)
    ]
    Sampler(16, torch.device("cpu"))(logits, seqs)
    for row, (h, g) in enumerate(zip(histories, guides, strict=True)):
        ref = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([h]), logits[row : row + 1].clone())[0]
        for t in set(h[3:]):
            ref[t] -= 1.0 * h[3:].count(t) - 0.5
        torch.testing.assert_close(g.seen, ref)


def test_min_new_tokens_masks_stop_ids_and_bad_tokens_always_masked():
    logits = torch.tensor([[0.0, 1.0, 9.0, 8.0, 2.0]] * 3)
    cfg = GenerationConfig(min_new_tokens=3, bad_token_ids=[3])
    seqs = [
        FakeSeq(cfg, num_new_tokens=0, stop_ids=[2]),
        FakeSeq(cfg, num_new_tokens=2, stop_ids=[2, 4]),
        FakeSeq(cfg, num_new_tokens=3, stop_ids=[2]),
    ]
    out = Sampler(5, torch.device("cpu"))(logits, seqs).token_ids
    assert out.tolist() == [4, 1, 2]


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_raw_log_softmax(device):
    torch.manual_seed(3)
    logits = (torch.randn(3, 30) * 3).to(device)
    raw = logits.clone()
    seqs = [
        FakeSeq(GenerationConfig(logprobs=2, repetition_penalty=2.0), token_ids=[1, 2, 3], num_prompt_tokens=3),
        FakeSeq(GenerationConfig(do_sample=True, temperature=0.5, logprobs=5)),
        FakeSeq(GenerationConfig(bad_token_ids=[0, 1, 2])),
    ]
    out = Sampler(30, torch.device(device))(logits, seqs)
    assert torch.equal(logits, raw)  # the caller's logits are not modified
    ref = raw.log_softmax(-1)
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.token_ids[:, None])[:, 0])
    top_values, top_ids = ref.topk(5, dim=-1)
    assert torch.equal(out.top_ids, top_ids)
    torch.testing.assert_close(out.top_logprobs, top_values)


def test_logprobs_zero_gives_no_top_tensors():
    out = Sampler(4, torch.device("cpu"))(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), [FakeSeq(GenerationConfig(logprobs=0))])
    assert out.top_ids is None and out.top_logprobs is None
    torch.testing.assert_close(out.logprobs, torch.tensor([3.0]) - torch.tensor([0.0, 1.0, 2.0, 3.0]).logsumexp(0))


@pytest.mark.parametrize("do_sample", [False, True])
def test_guide_mask_is_applied(do_sample):
    logits = torch.arange(10.0).expand(400, -1).contiguous()
    cfg = GenerationConfig(do_sample=do_sample, temperature=3.0)
    out = Sampler(10, torch.device("cpu"))(logits, [FakeSeq(cfg, guide=SpyGuide([0, 2, 4])) for _ in range(400)])
    assert set(out.token_ids.tolist()) <= {0, 2, 4}
    assert (4 in out.token_ids.tolist()) and (do_sample == (len(set(out.token_ids.tolist())) > 1))


def test_padded_vocab_columns_are_never_sampled():
    logits = torch.tensor([[0.0, 1.0, 100.0, 100.0]] * 200)
    out = Sampler(2, torch.device("cpu"))(logits, [FakeSeq(GenerationConfig(do_sample=True))] * 200)
    assert int(out.token_ids.max()) <= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_device_sync_on_cuda():
    vocab = 1000
    torch.manual_seed(4)
    cfgs = [
        GenerationConfig(),
        GenerationConfig(do_sample=True, temperature=0.6),
        GenerationConfig(do_sample=True, top_k=20, top_p=0.9, min_p=0.05, random_seed=3),
        GenerationConfig(do_sample=True, repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5),
        GenerationConfig(min_new_tokens=5, bad_token_ids=[7], logprobs=4),
    ]
    seqs = [
        FakeSeq(
            c,
            generator=torch.Generator("cuda").manual_seed(c.random_seed) if c.random_seed else None,
            token_ids=[1, 2, 3, 3, 9],
            num_prompt_tokens=2,
            num_new_tokens=3,
            stop_ids=[0],
        )
        for c in cfgs
    ]
    sampler = Sampler(vocab, torch.device("cuda"))
    logits = torch.randn(len(seqs), vocab, device="cuda")
    sampler(logits, seqs)  # warm-up: pinned-memory allocator, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampler(logits, seqs)
        top_k_top_p = [FakeSeq(GenerationConfig(do_sample=True, top_k=10, top_p=0.8))] * len(seqs)
        assert sampler(logits, top_k_top_p).token_ids.shape == (len(seqs),)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.token_ids.shape == (len(seqs),) and out.top_ids.shape == (len(seqs), 4)
    assert int(out.token_ids[0]) == int(logits[0].argmax())


@pytest.mark.parametrize("device", DEVICES)
def test_logit_bias_is_added_to_the_logits_before_sampling(device):
    """OpenAI semantics: the bias adds to the logit, so +100 forces a token, -100 bans it, and a small bias shifts
    the sampled frequencies to softmax((logits + bias) / T), the reference computed here by hand."""
    torch.manual_seed(0)
    logits = torch.randn(12)
    top = int(logits.argmax())
    low = int(logits.argmin())
    greedy = GenerationConfig(logit_bias={low: 100.0})
    assert sample(greedy, logits, 4, device).tolist() == [low] * 4
    banned = GenerationConfig(logit_bias={top: -100.0})
    assert top not in sample(banned, logits, 4, device).tolist()
    forced = GenerationConfig(do_sample=True, temperature=1.5, logit_bias={low: 100.0})
    assert set(sample(forced, logits, 200, device).tolist()) == {low}
    bias = {3: 1.5, 7: -2.0}
    shifted = logits.clone()
    for t, b in bias.items():
        shifted[t] += b
    draws = sample(GenerationConfig(do_sample=True, temperature=1.0, logit_bias=bias), logits, 20000, device)
    assert chi_square(draws, shifted.softmax(-1)) < 40  # 11 degrees of freedom: p < 1e-4 if the bias were wrong
    # one row's bias never reaches another row of the batch
    batch = logits.to(device).expand(2, -1).contiguous()
    out = Sampler(12, torch.device(device))(batch, [FakeSeq(greedy), FakeSeq(GenerationConfig())]).token_ids
    assert out.tolist() == [low, top]


def test_logit_bias_is_validated():
    for bad in ({3: 101.0}, {-1: 1.0}, {"3": 1.0}):
        with pytest.raises(ValueError, match="logit_bias"):
            GenerationConfig(logit_bias=bad)
