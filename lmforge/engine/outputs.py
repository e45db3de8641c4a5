"""What the engine hands back per step: streamed deltas of each request, and engine statistics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # top-n (token_id, logprob) of the model distribution


@dataclass(slots=True)
class RequestOutput:
    """One delta of a request: the text and tokens new since its previous output."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # None while running, then 'stop' | 'length' | 'abort' | 'error'
    num_prompt_tokens: int
    num_generated_tokens: int
    error: str | None = None


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    kv_usage: float
    prompt_tokens_total: int
    generation_tokens_total: int
    prefix_cache_hit_tokens: int = 0
