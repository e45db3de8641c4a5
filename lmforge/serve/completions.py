"""POST /v1/completions: prompts as text, token ids or batches of either; n choices per prompt, echo, logprobs."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from .context import ServeContext
from .errors import APIError, invalid
from .generation import (
    SSE_DONE,
    Choice,
    RequestRecord,
    build_gen_config,
    check_context,
    closer,
    collect_outputs,
    engine_error,
    observed_outputs,
    sse,
)
from .prompts import check_prompt_chars
from .protocol import (
    MAX_N,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from .streaming import EventStreamResponse, run_unless_disconnected

MAX_CHOICES = 4 * MAX_N  # prompts x n in one request


def _prompt_items(req: CompletionRequest, ctx: ServeContext) -> list[str | list[int]]:
    """The prompts of a request, checked for what costs nothing to check: emptiness, lengths, the vocabulary."""
    p = req.prompt
    if isinstance(p, str):
        items: list = [p]
    elif p and all(isinstance(x, int) for x in p):
        items = [list(p)]
    else:
        items = list(p)
    if not items:
        raise invalid("prompt must not be empty", "prompt")
    session_len = ctx.engine.session_len
    for item in items:
        if isinstance(item, str):
            if ctx.tokenizer is None:
                raise invalid("this model has no tokenizer: send the prompt as token ids", "prompt")
            check_prompt_chars(len(item), session_len, ctx.max_token_chars, "prompt")
        else:
            check_context(len(item), req.max_tokens, session_len, "prompt")  # before the per-id scan
            vocab = ctx.engine.vocab_size
            bad = None
            if item and (min(item) < 0 or max(item) >= vocab):  # two C-speed passes; the first bad id on failure
                bad = next(t for t in item if t < 0 or t >= vocab)
            if bad is not None:
                raise invalid(
                    f"token id {bad} is outside this model's vocabulary [0, {ctx.engine.vocab_size})", "prompt"
                )
    return items


def _encode_prompts(
    items: list[str | list[int]], ctx: ServeContext, parse_special: bool = False
) -> list[tuple[str | None, list[int]]]:
    """(text, token ids) per prompt; text is None when the client sent ids. Runs in the prompt thread pool."""
    out = []
    for item in items:
        if isinstance(item, str):
            # special-token text stays plain unless the client asks for it (parse_special_tokens)
            ids = ctx.tokenizer.encode(item, add_special_tokens=True, parse_special=parse_special)
            out.append((item, ids))
        else:
            out.append((None, list(item)))
        if not out[-1][1]:
            raise invalid("prompt must not be empty: it encodes to no tokens", "prompt")
    return out


def _logprobs(ctx: ServeContext, entries: list, offset: int, prompt_ids: list[int] | None) -> CompletionLogprobs:
    """OpenAI's legacy logprobs. Echoed prompt tokens carry no logprob (the engine does not score prompts)."""
    lp = CompletionLogprobs()
    tokens = [(t, None, None) for t in prompt_ids or []]
    tokens += [(e.token_id, e.logprob, e.top) for e in entries]
    for token_id, logprob, top in tokens:
        s = ctx.token_strings(token_id)
        lp.tokens.append(s)
        lp.token_logprobs.append(None if logprob is None else max(logprob, -9999.0))
        lp.top_logprobs.append(None if top is None else {ctx.token_strings(t): max(v, -9999.0) for t, v in top})
        lp.text_offset.append(offset)
        offset += len(s)
    return lp


async def create_completion(
    req: CompletionRequest, ctx: ServeContext, request: Request, record: RequestRecord
) -> CompletionResponse | EventStreamResponse:
    arrival = time.perf_counter()
    ctx.check_model(req.model)
    items = _prompt_items(req, ctx)
    if len(items) * req.n > MAX_CHOICES:
        raise invalid(f"at most {MAX_CHOICES} choices (prompts x n) per request, got {len(items) * req.n}", "n")
    if all(isinstance(item, list) for item in items):  # token ids: nothing to tokenize, no thread-pool hop
        prompts = _encode_prompts(items, ctx)
    else:
        prompts = await ctx.workers.run(_encode_prompts, items, ctx, req.parse_special_tokens)
    rid = f"cmpl-{uuid.uuid4().hex}"
    record.request_id = rid
    jobs, choices = [], []
    for p, (_, ids) in enumerate(prompts):
        max_new = check_context(len(ids), req.max_tokens, ctx.engine.session_len, "prompt")
        record.prompt_tokens += len(ids)
        for i in range(req.n):
            cfg = build_gen_config(req, max_new, req.logprobs, i, ctx.generation_defaults, ctx.engine.vocab_size)
            jobs.append((ids, cfg, f"{rid}-{len(choices)}", None))
            choices.append(Choice(len(choices), prompt_index=p))
    slot = ctx.acquire([job[2] for job in jobs])
    if req.stream:
        return EventStreamResponse(
            _events(req, ctx, rid, prompts, jobs, choices, arrival, record), on_close=closer(slot, record, choices)
        )
    try:
        return await run_unless_disconnected(request, _collect(req, ctx, rid, prompts, jobs, choices, arrival, record))
    finally:
        closer(slot, record, choices)()


async def _collect(req, ctx, rid, prompts, jobs, choices: list[Choice], arrival, record) -> CompletionResponse:
    await collect_outputs(ctx, jobs, choices, arrival, record, "prompt")
    result = []
    for c in choices:
        text, ids = prompts[c.prompt_index]
        echo = (text if text is not None else ctx.tokenizer.decode(ids) if ctx.tokenizer else "") if req.echo else ""
        lp = None
        if req.logprobs is not None:
            lp = _logprobs(ctx, c.logprobs, 0, ids if req.echo else None)
        result.append(
            CompletionChoice(index=c.index, text=echo + "".join(c.text), logprobs=lp, finish_reason=c.finish_reason)
        )
    return CompletionResponse(id=rid, model=req.model, choices=result, usage=record.usage())


async def _events(req, ctx, rid, prompts, jobs, choices: list[Choice], arrival, record) -> AsyncIterator[str]:
    created = int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    offsets = [0] * len(choices)

    # every chunk is this JSON with its index, text, logprobs and finish_reason filled in (json.dumps' own layout):
    # only the text is encoded per token
    head = json.dumps({"id": rid, "object": "text_completion", "created": created, "model": req.model})[:-1]
    tail = ', "usage": null}' if include_usage else "}"

    def chunk(index: int, text: str, logprobs: CompletionLogprobs | None, finish: str | None) -> str:
        lp = "null" if logprobs is None else json.dumps(logprobs.model_dump())
        fin = "null" if finish is None else json.dumps(finish)
        return (
            f'data: {head}, "choices": [{{"index": {index}, "text": {json.dumps(text)}, "logprobs": {lp}, '
            f'"finish_reason": {fin}}}]{tail}\n\n'
        )

    try:
        if req.echo:
            for c in choices:
                text, ids = prompts[c.prompt_index]
                text = text if text is not None else ctx.tokenizer.decode(ids) if ctx.tokenizer else ""
                lp = _logprobs(ctx, [], 0, ids) if req.logprobs is not None else None
                offsets[c.index] = len(text)
                yield chunk(c.index, text, lp, None)
        async with contextlib.aclosing(observed_outputs(ctx, jobs, choices, arrival, record)) as outputs:
            async for i, out in outputs:
                lp = None
                if req.logprobs is not None and out.logprobs:
                    lp = _logprobs(ctx, out.logprobs, offsets[i], None)
                offsets[i] += len(out.text)
                if out.text or lp is not None or out.finish_reason is not None:
                    yield chunk(i, out.text, lp, out.finish_reason)
        ctx.metrics.e2e.observe(time.perf_counter() - arrival)
        if include_usage:
            usage = record.usage()
            yield sse(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": req.model,
                    "choices": [],
                    "usage": usage.model_dump(),
                }
            )
    except APIError as e:
        yield sse(e.body())
    except Exception as e:
        yield sse(engine_error(e, "prompt").body())
    yield SSE_DONE
