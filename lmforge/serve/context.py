"""ServeContext: what every endpoint needs (engine, served names, metrics, concurrency slots), held by the app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from lmforge.engine.outputs import EngineStats, RequestOutput
from lmforge.messages import GenerationConfig

from .errors import APIError, model_not_found
from .generation import TokenStrings
from .metrics import ServerMetrics
from .prompts import PromptWorkers, max_token_chars


class ServingEngine(Protocol):
    """What the server needs of an engine; lmforge.engine.async_engine.AsyncEngine is the real one."""

    tokenizer: object  # lmforge.tokenizer.Tokenizer, or None for a model without tokenizer files
    model_name: str
    session_len: int
    vocab_size: int

    def generate(
        self, input_ids: list[int], gen_config: GenerationConfig, request_id: str | None = None, guide: object = None
    ) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    async def close(self) -> None: ...


class Slot:
    """One admitted generation request; release() is idempotent so every exit path may call it."""

    def __init__(self, ctx: ServeContext, request_ids: list[str]):
        self.ctx = ctx
        self.request_ids = request_ids
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.ctx.slots.discard(self)
            self.ctx.metrics.in_flight.dec()


@dataclass
class ServeContext:
    engine: ServingEngine
    served_model_names: list[str]
    metrics: ServerMetrics
    max_concurrent_requests: int | None = None
    slots: set[Slot] = field(default_factory=set)
    token_strings: TokenStrings = field(init=False)
    workers: PromptWorkers = field(default_factory=PromptWorkers)  # tokenization, templating, grammar compiling
    _max_token_chars: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.token_strings = TokenStrings(self.engine.tokenizer)

    def max_token_chars(self) -> int:
        """No token spans more characters (lmforge.serve.prompts); computed once, on the first long prompt."""
        if self._max_token_chars is None:
            tok = self.engine.tokenizer
            self._max_token_chars = max_token_chars(tok) if tok is not None else 1
        return self._max_token_chars

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def check_model(self, name: str) -> None:
        if name not in self.served_model_names:
            raise model_not_found(name, self.served_model_names)

    @property
    def num_in_flight(self) -> int:
        return len(self.slots)

    def acquire(self, request_ids: list[str]) -> Slot:
        """Admit a generation request (its engine request ids), or 429 when --max-concurrent-requests are running."""
        if self.max_concurrent_requests is not None and self.num_in_flight >= self.max_concurrent_requests:
            raise APIError(
                429,
                f"Too many concurrent requests: this server handles at most "
                f"{self.max_concurrent_requests} at a time. Retry shortly.",
                "rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        slot = Slot(self, request_ids)
        self.slots.add(slot)
        self.metrics.in_flight.inc()
        return slot

    async def abort_all(self) -> int:
        """Abort every in-flight engine request (server shutdown): their streams end with finish_reason 'abort'."""
        request_ids = [rid for slot in list(self.slots) for rid in slot.request_ids]
        for rid in request_ids:
            await self.engine.abort(rid)
        return len(request_ids)
