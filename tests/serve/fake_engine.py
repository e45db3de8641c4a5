"""A stand-in for AsyncEngine with the same protocol, for server tests that need control the real engine does not
give: a fixed delay per token (so a test can disconnect mid-stream), injected failures, and exact block accounting.

Tokens come from seeded random logits over a real tokenizer, so guides, stop strings and logprobs are exercised.
"""

from __future__ import annotations

import asyncio
import math

import torch

from lmforge.engine.errors import ContextLengthError, RequestError
from lmforge.engine.outputs import EngineStats, RequestOutput, TokenLogprob
from lmforge.messages import GenerationConfig


class FakeEngine:
    def __init__(
        self,
        tokenizer,
        vocab_size: int | None = None,
        session_len: int = 256,
        num_blocks: int = 64,
        block_size: int = 16,
        token_delay: float = 0.0,
    ):
        self.tokenizer = tokenizer
        self.model_name = "fake-model"
        self.vocab_size = vocab_size or tokenizer.vocab_size
        self.session_len = session_len
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks = num_blocks
        self.token_delay = token_delay
        self.num_running = 0
        self.prompt_tokens_total = self.generation_tokens_total = 0
        self.fail_after: int | None = None  # tokens after which a request finishes with 'error'
        self.aborted: list[str] = []
        self.closed = False

    def stats(self) -> EngineStats:
        used = self.num_blocks - self.free_blocks
        return EngineStats(
            self.num_running,
            0,
            self.free_blocks,
            self.num_blocks,
            used / self.num_blocks,
            self.prompt_tokens_total,
            self.generation_tokens_total,
        )

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def close(self) -> None:
        self.closed = True

    def _validate(self, input_ids: list[int], cfg: GenerationConfig) -> None:
        if not input_ids:
            raise RequestError("the prompt is empty")
        if any(t < 0 or t >= self.vocab_size for t in input_ids):
            raise RequestError(f"token ids must be in [0, {self.vocab_size})")
        if len(input_ids) >= self.session_len:
            raise ContextLengthError(len(input_ids), self.session_len)
        cfg.validate()

    async def generate(
        self, input_ids: list[int], gen_config: GenerationConfig, request_id: str | None = None, guide=None
    ):
        self._validate(input_ids, gen_config)
        cfg, rid, n_prompt = gen_config, request_id or "fake", len(input_ids)
        seed = cfg.random_seed if (cfg.random_seed is not None and not cfg.is_greedy) else hash(tuple(input_ids))
        gen = torch.Generator().manual_seed(
            seed % 2**63 if cfg.is_greedy or cfg.random_seed is not None else int(torch.randint(0, 2**62, ()))
        )
        blocks = math.ceil((n_prompt + cfg.max_new_tokens) / self.block_size)
        self.free_blocks -= blocks
        self.num_running += 1
        self.prompt_tokens_total += n_prompt
        eos = set(self.tokenizer.eos_token_ids)
        tokens: list[int] = []
        emitted = ""
        finished = False
        try:
            if cfg.max_new_tokens == 0:
                finished = True
                yield RequestOutput(rid, "", [], None, "length", n_prompt, 0)
                return
            while True:
                await asyncio.sleep(self.token_delay)
                if self.fail_after is not None and len(tokens) >= self.fail_after:
                    finished = True
                    yield RequestOutput(rid, "", [], None, "error", n_prompt, len(tokens), "injected failure")
                    return
                logits = torch.randn(self.vocab_size, generator=gen) * 3
                if guide is not None:
                    guide.fill_mask(logits)
                elif len(tokens) < cfg.min_new_tokens or cfg.ignore_eos:
                    logits[list(eos)] = float("-inf")
                logp = torch.log_softmax(logits, -1)
                if cfg.is_greedy:
                    token = int(torch.argmax(logits))
                else:
                    token = int(torch.multinomial(torch.softmax(logits / cfg.temperature, -1), 1, generator=gen))
                lps = None
                if cfg.logprobs is not None:
                    top = torch.topk(logp, cfg.logprobs) if cfg.logprobs else None
                    pairs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else []
                    lps = [TokenLogprob(token, float(logp[token]), pairs)]
                if guide is not None:
                    guide.accept(token)
                tokens.append(token)
                self.generation_tokens_total += 1
                text = self.tokenizer.decode(tokens)
                finish = None
                for stop in cfg.stop_words or []:
                    if stop in text:
                        text, finish = text[: text.index(stop)], "stop"
                if finish is None and token in eos and not cfg.ignore_eos:
                    finish = "stop"
                elif finish is None and guide is not None and guide.is_terminated():
                    finish = "stop"
                elif finish is None and len(tokens) >= min(cfg.max_new_tokens, self.session_len - n_prompt):
                    finish = "length"
                delta, emitted = text[len(emitted) :], max(text, emitted, key=len)
                finished = finish is not None
                yield RequestOutput(rid, delta, [token], lps, finish, n_prompt, len(tokens))
                if finished:
                    return
        finally:
            if not finished:
                self.aborted.append(rid)
            self.free_blocks += blocks
            self.num_running -= 1
