"""Batched sampler: the engine hands it the float32 last-token logits of every sequence that samples
this step (a prefill chunk that does not reach the end of its prompt does not).

Order (HF logits-processor order where they overlap): penalties -> logit_bias -> bad/min-token masks -> guide mask ->
temperature -> top-k -> top-p -> min-p -> draw. Greedy rows take the argmax after the masks. Everything is batched
over rows; only rows with their own seeded generator or a grammar guide get a Python loop, and nothing here calls
`.item()`/`.tolist()`, so the step stays free of host<->device syncs until the engine reads the token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, islice
from typing import Protocol

import numpy as np
import torch

from lmforge.backends.registry import get_op
from lmforge.engine.staging import PinnedStaging
from lmforge.kernels import cpu as cpu_kernels
from lmforge.messages import GenerationConfig


class Guide(Protocol):
    def fill_mask(self, logits_row: torch.Tensor) -> None:
        """Set disallowed tokens of a vocab-sized 1-D row to -inf, in place."""


class SamplingSeq(Protocol):
    """What the sampler reads from the engine's Sequence."""

    gen_config: GenerationConfig
    generator: torch.Generator | None  # on the logits' device; set when random_seed is given
    token_ids: list[int]  # prompt + generated so far
    num_prompt_tokens: int
    num_new_tokens: int
    stop_ids: list[int]  # eos ids (unless ignore_eos) + stop_token_ids
    guide: Guide | None


@dataclass(slots=True)
class SampleResult:
    token_ids: torch.Tensor  # [num_seqs] int64
    logprobs: torch.Tensor | None = None  # [num_seqs] float32, log-softmax of the raw logits at the chosen token
    top_ids: torch.Tensor | None = None  # [num_seqs, k] int64, k = max logprobs asked in the batch
    top_logprobs: torch.Tensor | None = None  # [num_seqs, k] float32


# Rows of the packed per-row parameter tensor (one host->device copy per call).
_TEMP, _TOP_P, _MIN_P, _TOP_K, _REP, _PRES, _FREQ, _GREEDY = range(8)

# Feature bits of a row (RowInfo.flags): the batch's union decides which passes a call runs.
_F_SAMPLE, _F_LOGPROBS, _F_REP, _F_PRES_FREQ, _F_BIAS, _F_BAD, _F_MIN_TOKENS, _F_TOP_P, _F_TOP_K, _F_MIN_P = (
    1 << i for i in range(10)
)


@dataclass(slots=True, frozen=True)
class RowInfo:
    """What the sampler needs of one request that does not change while it runs: its packed parameter column and
    its feature bits. The engine computes it once per request (Sampler.row_info) and keeps it on the Sequence as
    `sampling`; a sequence without one gets it computed on each call."""

    params: tuple[float, ...]  # the 8 packed values, in _TEMP.. _GREEDY order
    flags: int
    top_k: int  # 0 = off (also for greedy rows and k >= vocab)
    logprobs: int | None

    @property
    def penalised(self) -> bool:
        """Repetition / presence / frequency penalties: sampling reads the row's token history on the host."""
        return bool(self.flags & (_F_REP | _F_PRES_FREQ))


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.staging = PinnedStaging(self.device)
        # the greedy token: one launch over the row on cuda (torch's reduction streams a vocab row in one block)
        self.argmax = get_op("argmax_rows", self.device.type)

    def row_info(self, cfg: GenerationConfig, stop_ids: Sequence[int] = ()) -> RowInfo:
        """The per-request part of a call's host work, done once (see RowInfo)."""
        greedy = cfg.is_greedy
        top_k = 0 if greedy or not 0 < cfg.top_k < self.vocab_size else cfg.top_k
        params = (
            1.0 if greedy else cfg.temperature,
            # top_p == 1 must keep the whole tail even when the float cumsum reaches 1.0 early.
            float("inf") if greedy or cfg.top_p >= 1.0 else cfg.top_p,
            0.0 if greedy else cfg.min_p,
            float(top_k),
            cfg.repetition_penalty,
            cfg.presence_penalty,
            cfg.frequency_penalty,
            1.0 if greedy else 0.0,
        )
        flags = 0
        for bit, on in (
            (_F_SAMPLE, not greedy),
            (_F_LOGPROBS, cfg.logprobs is not None),
            (_F_REP, cfg.repetition_penalty != 1.0),
            (_F_PRES_FREQ, cfg.presence_penalty != 0.0 or cfg.frequency_penalty != 0.0),
            (_F_BIAS, any(b != 0 for b in (cfg.logit_bias or {}).values())),
            (_F_BAD, any(t < self.vocab_size for t in cfg.bad_token_ids or ())),
            (_F_MIN_TOKENS, cfg.min_new_tokens > 0 and any(t < self.vocab_size for t in stop_ids)),
            (_F_TOP_P, not greedy and cfg.top_p < 1.0),
            (_F_TOP_K, top_k > 0),
            (_F_MIN_P, not greedy and cfg.min_p > 0.0),
        ):
            if on:
                flags |= bit
        return RowInfo(params, flags, top_k, cfg.logprobs)

    def _infos(self, seqs: Sequence[SamplingSeq]) -> list[RowInfo]:
        infos = []
        for s in seqs:
            info = getattr(s, "sampling", None)
            infos.append(info if info is not None else self.row_info(s.gen_config, s.stop_ids))
        return infos

    def __call__(self, logits: torch.Tensor, seqs: Sequence[SamplingSeq]) -> SampleResult:
        """logits: [num_seqs, >= vocab_size] float32 (padded vocab columns are ignored); it is not modified."""
        logits = logits[:, : self.vocab_size]
        infos = self._infos(seqs)
        flags = num_sampling = 0
        for info in infos:
            flags |= info.flags
            num_sampling += info.flags & _F_SAMPLE
        cfgs = [s.gen_config for s in seqs]
        # [8, num_seqs] (a transposed view: one host->device copy of the rows as they are); a plain greedy batch
        # reads none of it, so it gets no copy
        params = None
        if num_sampling or flags & (_F_REP | _F_PRES_FREQ):
            params = self._to_device(
                torch.tensor([info.params for info in infos], dtype=torch.float32).view(len(infos), 8), torch.float32
            ).T
        raw_logprobs = logits.log_softmax(dim=-1) if flags & _F_LOGPROBS else None

        has_rep = bool(flags & _F_REP)
        has_pres_freq = bool(flags & _F_PRES_FREQ)
        masked = self._mask_pairs(seqs, infos) if flags & (_F_BAD | _F_MIN_TOKENS) else None
        biased = self._bias_entries(cfgs) if flags & _F_BIAS else None
        guided = [i for i, s in enumerate(seqs) if s.guide is not None]
        if (masked is not None or biased is not None or guided) and not (has_rep or has_pres_freq):
            logits = logits.clone()  # masks write in place; the caller's tensor stays raw
        if has_rep or has_pres_freq:
            logits = self._apply_penalties(logits, seqs, params, has_rep)
        if biased is not None:
            rows, tokens, values = biased
            logits.index_put_((rows, tokens), values, accumulate=True)
        if masked is not None:
            logits.index_put_(masked, logits.new_full((), float("-inf")))
        for i in guided:
            seqs[i].guide.fill_mask(logits[i])

        if infos and num_sampling == len(infos):  # no greedy row: no argmax pass over the batch's logits
            token_ids = self._sample(logits, seqs, cfgs, params, infos, flags)
        else:
            token_ids = self.argmax(logits)
            if num_sampling:
                sampled_ids = self._sample(logits, seqs, cfgs, params, infos, flags)
                token_ids = torch.where(params[_GREEDY] > 0, token_ids, sampled_ids)
        return _with_logprobs(token_ids, raw_logprobs, infos)

    def _to_device(self, data: list | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # A plain torch.tensor(..., device='cuda') copies from pageable memory and waits for the stream (a sync);
        # a pinned buffer lets the copy queue behind the forward pass instead.
        return self.staging.to_device(torch.as_tensor(data, dtype=dtype))

    def _mask_pairs(
        self, seqs: Sequence[SamplingSeq], infos: list[RowInfo]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(row, token) index pairs forced to -inf: bad tokens always, stop ids until min_new_tokens is reached."""
        rows: list[int] = []
        tokens: list[int] = []
        for i, s in enumerate(seqs):
            if not infos[i].flags & (_F_BAD | _F_MIN_TOKENS):
                continue
            cfg = s.gen_config
            banned = list(cfg.bad_token_ids or ())
            if s.num_new_tokens < cfg.min_new_tokens:
                banned += s.stop_ids
            banned = [t for t in banned if t < self.vocab_size]
            rows += [i] * len(banned)
            tokens += banned
        if not rows:
            return None
        pairs = self._to_device([rows, tokens], torch.int64)
        return pairs[0], pairs[1]

    def _bias_entries(self, cfgs: list[GenerationConfig]) -> tuple[torch.Tensor, ...] | None:
        """logit_bias as (row, token, bias) device tensors (validate_request has checked the ids)."""
        rows: list[int] = []
        tokens: list[int] = []
        values: list[float] = []
        for i, c in enumerate(cfgs):
            for t, b in (c.logit_bias or {}).items():
                if b != 0:
                    rows.append(i)
                    tokens.append(t)
                    values.append(float(b))
        if not rows:
            return None
        pairs = self._to_device([rows, tokens], torch.int64)
        return pairs[0], pairs[1], self._to_device(values, torch.float32)

    def _history(self, seqs: Sequence[SamplingSeq], with_prompt: bool) -> tuple[torch.Tensor, ...]:
        """Flattened token history on the device: (row, token id, is_generated), one entry per token.

        This is O(total tokens) host work per step, so only penalised batches pay it; np.fromiter over the lists
        is ~10x faster than torch.tensor on nested lists, and rows are expanded on the device.
        """
        starts = [0 if with_prompt else s.num_prompt_tokens for s in seqs]
        lengths = [len(s.token_ids) - start for s, start in zip(seqs, starts, strict=True)]
        total = sum(lengths)
        ids = chain.from_iterable(islice(s.token_ids, start, None) for s, start in zip(seqs, starts, strict=True))
        tokens = self._to_device(torch.from_numpy(np.fromiter(ids, dtype=np.int64, count=total)), torch.int64)
        num_prompt = [s.num_prompt_tokens - start for s, start in zip(seqs, starts, strict=True)]
        lengths_t, num_prompt_t = self._to_device([lengths, num_prompt], torch.int64)
        # output_size keeps repeat_interleave from reading the total back from the device (a sync).
        rows = torch.arange(len(seqs), device=tokens.device).repeat_interleave(lengths_t, output_size=total)
        position = torch.arange(total, device=tokens.device) - (lengths_t.cumsum(0) - lengths_t)[rows]
        return rows, tokens, position >= num_prompt_t[rows]

    def _apply_penalties(
        self, logits: torch.Tensor, seqs: Sequence[SamplingSeq], params: torch.Tensor, has_rep: bool
    ) -> torch.Tensor:
        """Repetition penalty (HF RepetitionPenaltyLogitsProcessor, over prompt + output: positive logits divided,
        negative multiplied), then the OpenAI penalties over generated tokens only:
        logit -= frequency * count + presence * (count > 0)."""
        rows, tokens, is_generated = self._history(seqs, with_prompt=has_rep)
        flat_ids = rows * logits.shape[1] + tokens  # scatter on the flat view: atomics, no index_put sort
        if has_rep:
            seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
            seen.view(-1).scatter_(0, flat_ids, True)
            penalty = params[_REP][:, None]
            logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
        counts = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
        counts.view(-1).scatter_add_(0, flat_ids, is_generated.to(logits.dtype))
        return logits - params[_FREQ][:, None] * counts - params[_PRES][:, None] * (counts > 0).to(logits.dtype)

    def _sample(
        self,
        logits: torch.Tensor,
        seqs: Sequence[SamplingSeq],
        cfgs: list[GenerationConfig],
        params: torch.Tensor,
        infos: list[RowInfo],
        flags: int,
    ) -> torch.Tensor:
        if logits.device.type == "cpu" and not flags & (_F_TOP_P | _F_TOP_K | _F_MIN_P):
            token_ids = _temperature_draw(logits, params[_TEMP], seqs, cfgs)
            if token_ids is not None:
                return token_ids
        logits = logits / params[_TEMP][:, None]
        if flags & (_F_TOP_P | _F_TOP_K):
            top_ks = [info.top_k for info in infos if info.flags & _F_SAMPLE]
        if flags & _F_TOP_P:
            # top-p needs the candidates in order: all of them, or only the top max-k when every row has a top-k.
            if all(top_ks):
                candidates, candidate_ids = logits.topk(max(top_ks), dim=-1)
            else:
                candidates, candidate_ids = logits.sort(dim=-1, descending=True)
            logits = _top_k_top_p(logits, candidates, candidate_ids, params[_TOP_K], params[_TOP_P])
        elif flags & _F_TOP_K:
            logits = _top_k(logits, params[_TOP_K], max(top_ks))
        probs = logits.softmax(dim=-1)
        if flags & _F_MIN_P:
            threshold = params[_MIN_P][:, None] * probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < threshold, 0.0)
        # Exponential race: argmax(p / E), E ~ Exp(1) i.i.d., draws a token with probability p (renormalised),
        # so filtered rows need no renormalisation. Seeded rows redraw their noise from their own generator:
        # their tokens then depend only on their own logits and seed, not on the batch around them.
        if probs.device.type == "cpu":
            return _multinomial(probs, _uniforms(seqs, cfgs, probs.shape[0]))
        noise = torch.empty_like(probs).exponential_()
        for i, s in enumerate(seqs):
            if s.generator is not None and not cfgs[i].is_greedy:
                noise[i].exponential_(generator=s.generator)
        # exponential_ may return exactly 0; 0/0 would be NaN, which argmax would pick.
        noise.clamp_min_(torch.finfo(noise.dtype).tiny)
        return (probs / noise).argmax(dim=-1)


def _uniforms(seqs, cfgs, num_rows: int) -> torch.Tensor:
    """One float64 number in [0, 1) per row for the CPU draw: seeded rows draw theirs from their own generator, so
    they stay independent of the batch."""
    u = torch.rand(num_rows, 1, dtype=torch.float64)
    for i, s in enumerate(seqs):
        if s.generator is not None and not cfgs[i].is_greedy:
            u[i] = torch.rand(1, generator=s.generator, dtype=torch.float64)
    return u


def _temperature_draw(logits: torch.Tensor, temperatures: torch.Tensor, seqs, cfgs) -> torch.Tensor | None:
    """_multinomial's draw from softmax(logits / temperature) (the same uniform numbers) in one CPU kernel over the
    raw logits, for rows with no top-k, top-p or min-p: ~1 ms for 32 rows of 49k where the torch ops (divide,
    softmax, float64 cumsum, searchsorted) took ~18 (2-core Xeon). None when the kernels are off."""
    u = _uniforms(seqs, cfgs, logits.shape[0])
    token_ids = cpu_kernels.sample_temperature(logits, temperatures, u)
    if token_ids is None:
        return None
    bad = token_ids < 0  # a NaN or +inf in the row, or nothing finite: the torch draw (and its fallback)
    if bad.any():
        probs = (logits[bad] / temperatures[bad][:, None]).softmax(dim=-1)
        token_ids[bad] = _multinomial(probs, u[bad])
    return token_ids


def _multinomial(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """CPU draw by inverse CDF: one uniform number per row, located in the row's cumulative sums (float64, so the
    tail of a 150k vocabulary keeps its mass). The exponential race would first generate a random number per
    vocabulary entry, and torch.multinomial took 44 ms for 32 rows of 49k on two cores (a fifth of the step).
    u: [num_rows, 1] float64 in [0, 1) (_uniforms)."""
    # a row with no valid probability (NaN, or everything masked) must not fail the whole batch: it falls
    # back to its most likely token
    bad = ~(torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0))
    if bad.any():
        probs = probs.clone()
        probs[bad] = torch.nn.functional.one_hot(probs[bad].nan_to_num(-1.0).argmax(-1), probs.shape[-1]).to(probs)
    cdf = probs.cumsum(-1, dtype=torch.float64)
    # (1 - u) * total lies in (0, total]: the first index whose cumulative sum reaches it has probability > 0
    target = (1.0 - u) * cdf[:, -1:]
    return torch.searchsorted(cdf, target).squeeze(1).clamp_max_(probs.shape[-1] - 1)


def _top_k(logits: torch.Tensor, top_k: torch.Tensor, max_k: int) -> torch.Tensor:
    """Keep logits >= the row's k-th largest (ties kept, as HF TopKLogitsWarper); top_k 0 = off."""
    values = logits.topk(max_k, dim=-1).values
    kth = values.gather(1, (top_k.long().clamp(min=1) - 1)[:, None])
    kth = kth.masked_fill(top_k[:, None] == 0, float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_k_top_p(
    logits: torch.Tensor,
    candidates: torch.Tensor,
    candidate_ids: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
) -> torch.Tensor:
    """candidates: [num_seqs, n] logits in descending order (the whole sorted row, or its top max-k) and their ids.
    Both filters work on them; the survivors are scattered back to vocab order, everything else is -inf."""
    kth = candidates.gather(1, (top_k.long().clamp(min=1) - 1).clamp(max=candidates.shape[1] - 1)[:, None])
    kth = kth.masked_fill(top_k[:, None] == 0, float("-inf"))
    candidates = candidates.masked_fill(candidates < kth, float("-inf"))
    # Keep a token while the mass strictly before it is < top_p: the smallest set with mass >= top_p,
    # and always the first token (HF TopPLogitsWarper gives the same set).
    probs = candidates.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= top_p[:, None]
    drop[:, 0] = False
    candidates = candidates.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(1, candidate_ids, candidates)


def _with_logprobs(token_ids: torch.Tensor, raw_logprobs: torch.Tensor | None, infos: list[RowInfo]) -> SampleResult:
    """Logprobs come from the raw logits: OpenAI reports the model's distribution, not the sampling one."""
    if raw_logprobs is None:
        return SampleResult(token_ids)
    chosen = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)
    k = max(info.logprobs for info in infos if info.logprobs is not None)
    if k == 0:
        return SampleResult(token_ids, chosen)
    top_logprobs, top_ids = raw_logprobs.topk(k, dim=-1)
    return SampleResult(token_ids, chosen, top_ids, top_logprobs)
