"""What the completion and chat endpoints share: OpenAI parameters -> GenerationConfig, running n engine requests
as one merged stream, per-choice latency metrics, logprob token strings, and SSE framing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pydantic import BaseModel

from lmforge.messages import GenerationConfig

from .errors import APIError, context_length_error, invalid
from .metrics import ServerMetrics
from .protocol import MAX_STOP, SamplingRequest, UsageInfo


def stop_words(stop: str | list[str] | None) -> list[str] | None:
    if stop is None:
        return None
    words = [stop] if isinstance(stop, str) else list(stop)
    if len(words) > MAX_STOP:
        raise invalid(f"at most {MAX_STOP} stop strings are allowed, got {len(words)}", "stop")
    if any(not w for w in words):
        raise invalid("stop strings must not be empty", "stop")
    return words or None


def build_gen_config(
    req: SamplingRequest,
    max_new_tokens: int,
    logprobs: int | None,
    index: int,
    defaults: dict | None = None,
    vocab_size: int | None = None,
) -> GenerationConfig:
    """One choice's GenerationConfig. Choice i of a seeded request uses seed + i, so choices differ but repeat.

    `defaults`: the model's own sampling defaults (lmforge.generation_defaults), for what the request leaves unset.
    """
    defaults = defaults or {}

    def pick(name: str, fallback):
        value = getattr(req, name)
        return defaults.get(name, fallback) if value is None else value

    temperature = pick("temperature", 1.0)  # 1.0: OpenAI's default
    if req.min_tokens > max_new_tokens:
        raise invalid(f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({max_new_tokens})", "min_tokens")
    seed = None if req.seed is None else (req.seed + index) % 2**63
    try:
        return GenerationConfig(
            n=1,
            max_new_tokens=max_new_tokens,
            min_new_tokens=req.min_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,
            top_p=pick("top_p", 1.0),
            top_k=max(pick("top_k", 0), 0),
            min_p=pick("min_p", 0.0),
            repetition_penalty=pick("repetition_penalty", 1.0),
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            random_seed=seed,
            stop_words=stop_words(req.stop),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            logit_bias=logit_bias(req.logit_bias, vocab_size),
        )
    except ValueError as e:
        raise invalid(str(e)) from None


def logit_bias(bias: dict[str, float] | None, vocab_size: int | None = None) -> dict[int, float] | None:
    """OpenAI's logit_bias (token ids as JSON object keys) as GenerationConfig takes it; 400s name the entry."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise invalid(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            raise invalid(
                f"logit_bias token ids must be in [0, {vocab_size or 'vocab size'}), got {token}", "logit_bias"
            )
        if not -100.0 <= value <= 100.0:
            raise invalid(f"logit_bias values must be in [-100, 100], got {value} for token {token}", "logit_bias")
        out[token] = float(value)
    return out


def check_context(num_prompt: int, max_tokens: int | None, session_len: int, param: str) -> int:
    """max_new_tokens for a prompt: the request's max_tokens if it fits, else a context_length_exceeded error.

    Without max_tokens the completion may fill the rest of the context (OpenAI's chat behaviour).
    """
    if num_prompt >= session_len:
        raise context_length_error(num_prompt, max_tokens or 0, session_len, param)
    if max_tokens is None:
        return session_len - num_prompt
    if num_prompt + max_tokens > session_len:
        raise context_length_error(num_prompt, max_tokens, session_len, param)
    return max_tokens


def engine_error(exc: Exception, param: str) -> APIError:
    """Map an exception engine.generate raised before its first output to an API error."""
    num_tokens, max_tokens = getattr(exc, "num_tokens", None), getattr(exc, "max_tokens", None)
    if num_tokens is not None and max_tokens is not None:
        return context_length_error(num_tokens, 0, max_tokens, param)
    if isinstance(exc, ValueError):
        return invalid(str(exc), param)
    return APIError(500, f"the engine failed: {type(exc).__name__}: {exc}", "server_error")


@dataclass
class Choice:
    """Accumulated state of one choice; the chat and completion formatters read it."""

    index: int
    prompt_index: int = 0
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None


@dataclass
class RequestRecord:
    """Per-HTTP-request facts for the one-line request log (filled in as the request runs)."""

    request_id: str = "-"
    user: str | None = None  # the OpenAI `user` label: logged with the request, it changes no output
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)

    def usage(self) -> UsageInfo:
        return UsageInfo(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )


def closer(slot, record: RequestRecord, choices: list[Choice]):
    """on_close of a stream: free the concurrency slot and log choices that never finished as 'unfinished'."""

    def close() -> None:
        slot.release()
        if any(c.finish_reason is None for c in choices):
            record.finish_reasons.append("unfinished")

    return close


async def merge_outputs(engine, jobs: list[tuple[list[int], GenerationConfig, str, object]]) -> AsyncIterator:
    """Run one engine request per job and yield (job index, RequestOutput) as they arrive.

    Closing this generator (client gone, task cancelled) cancels every pump task, which closes each engine stream
    and so aborts its request.
    """
    if len(jobs) == 1:
        ids, cfg, rid, guide = jobs[0]
        stream = engine.generate(ids, cfg, request_id=rid, guide=guide)
        async with contextlib.aclosing(stream):
            async for out in stream:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, ids: list[int], cfg: GenerationConfig, rid: str, guide: object) -> None:
        try:
            stream = engine.generate(ids, cfg, request_id=rid, guide=guide)
            async with contextlib.aclosing(stream):
                async for out in stream:
                    queue.put_nowait((i, out))
            queue.put_nowait((i, done))
        except Exception as e:  # reported through the queue so the consumer raises it in its own task
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, *job)) for i, job in enumerate(jobs)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def observed_outputs(ctx, jobs, choices: list[Choice], arrival: float, record: RequestRecord) -> AsyncIterator:
    """merge_outputs, with each delta folded into its choice and the latency metrics (observe) before it is
    yielded; a failed generation raises a 500 APIError."""
    async with contextlib.aclosing(merge_outputs(ctx.engine, jobs)) as outputs:
        async for i, out in outputs:
            observe(choices[i], out, ctx.metrics, arrival, record)
            if out.finish_reason == "error":
                raise APIError(500, f"generation failed: {out.error}", "server_error")
            yield i, out


async def collect_outputs(ctx, jobs, choices: list[Choice], arrival: float, record: RequestRecord, param: str) -> None:
    """Run the jobs to the end for a reply that is not streamed: each choice gathers its text and logprobs.
    A failed generation is a 500; any other engine error becomes an APIError that names `param`."""
    try:
        async with contextlib.aclosing(observed_outputs(ctx, jobs, choices, arrival, record)) as outputs:
            async for i, out in outputs:
                choices[i].text.append(out.text)
                choices[i].logprobs.extend(out.logprobs or [])
    except APIError:
        raise
    except Exception as e:
        raise engine_error(e, param) from None
    ctx.metrics.e2e.observe(time.perf_counter() - arrival)


def observe(choice: Choice, out, metrics: ServerMetrics, arrival: float, record: RequestRecord) -> None:
    """Fold one engine delta into its choice and into the TTFT / inter-token histograms."""
    now = time.perf_counter()
    n = len(out.token_ids)
    if n:
        if choice.first_token_time is None:
            choice.first_token_time = now
            metrics.ttft.observe(now - arrival)
        else:
            gap = (now - choice.last_token_time) / n
            for _ in range(n):
                metrics.itl.observe(gap)
        choice.last_token_time = now
    record.completion_tokens += out.num_generated_tokens - choice.num_generated_tokens
    choice.num_prompt_tokens = out.num_prompt_tokens
    choice.num_generated_tokens = out.num_generated_tokens
    if out.finish_reason is not None:
        choice.finish_reason = out.finish_reason
        record.finish_reasons.append(out.finish_reason)
        metrics.finished.labels(out.finish_reason).inc()


class TokenStrings:
    """token id -> its text, for logprobs. Cached: the same few thousand ids recur in every reply."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else str(token_id)
            self._cache[token_id] = s
        return s


def sse(payload: BaseModel | dict) -> str:
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json()}\n\n"
    return f"data: {json.dumps(payload)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
