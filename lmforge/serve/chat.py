"""POST /v1/chat/completions: the model's chat template, n choices, logprobs, and response_format enforced by a
grammar (lmforge.engine.guided) so json_object / json_schema replies parse
(unless max_tokens cuts them off: finish_reason "length").
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from lmforge.engine.guided import Guide, compile_response_format
from lmforge.engine.guided_limits import DEFAULT_SCHEMA_LIMITS

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
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    TopLogprob,
)
from .streaming import EventStreamResponse, run_unless_disconnected


def _prompt_ids(req: ChatCompletionRequest, ctx: ServeContext) -> list[int]:
    tok = ctx.tokenizer
    if tok is None:
        raise invalid("this model has no tokenizer: use /v1/completions with token ids", "messages")
    # 'developer' is OpenAI's newer name for 'system'; chat templates only know the latter.
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    try:
        # control tokens only where the template puts them: message text spelling one stays plain text
        ids = tok.encode_chat(messages, add_generation_prompt=True)
    except Exception as e:  # jinja raises TemplateError (e.g. "roles must alternate") for chats it refuses
        raise invalid(f"the model's chat template rejected these messages: {e}", "messages") from None
    if not ids:
        raise invalid("messages encode to an empty prompt", "messages")
    return ids


async def _guides(req: ChatCompletionRequest, ctx: ServeContext) -> list:
    rf = req.response_format
    if rf is None or rf.type == "text":
        return [None] * req.n
    if rf.type == "json_schema" and (rf.json_schema is None or rf.json_schema.schema_ is None):
        raise invalid("response_format of type json_schema needs json_schema.schema", "response_format")
    spec = rf.model_dump(by_alias=True, exclude_none=True)
    tok = ctx.tokenizer
    budget = DEFAULT_SCHEMA_LIMITS.compile_timeout
    try:
        # Compiling walks the vocabulary: keep it off the event loop, once per request; each choice needs its own
        # matcher state. A compile past the budget keeps its thread until it ends (the schema limits bound that).
        compiled, vocab_size = await asyncio.wait_for(
            ctx.workers.run(compile_response_format, spec, tok.hf, ctx.engine.vocab_size, tok.eos_token_ids), budget
        )
    except ValueError as e:
        raise invalid(str(e), "response_format") from None
    except TimeoutError:
        raise invalid(
            f"response_format schema took longer than {budget:g} s to compile; simplify it", "response_format"
        ) from None
    return [Guide(compiled, vocab_size) for _ in range(req.n)]


def _logprobs(ctx: ServeContext, entries: list) -> ChatLogprobs:
    content = []
    for e in entries:
        s = ctx.token_strings(e.token_id)
        top = [
            TopLogprob(token=ctx.token_strings(t), logprob=max(v, -9999.0), bytes=list(ctx.token_strings(t).encode()))
            for t, v in e.top
        ]
        content.append(
            ChatTokenLogprob(token=s, logprob=max(e.logprob, -9999.0), bytes=list(s.encode()), top_logprobs=top)
        )
    return ChatLogprobs(content=content)


async def create_chat_completion(
    req: ChatCompletionRequest, ctx: ServeContext, request: Request, record: RequestRecord
) -> ChatCompletionResponse | EventStreamResponse:
    arrival = time.perf_counter()
    ctx.check_model(req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs needs logprobs to be true", "top_logprobs")
    num_chars = sum(len(m.text()) for m in req.messages)
    check_prompt_chars(num_chars, ctx.engine.session_len, ctx.max_token_chars, "messages")
    ids = await ctx.workers.run(_prompt_ids, req, ctx)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_new = check_context(len(ids), max_tokens, ctx.engine.session_len, "messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    configs = [build_gen_config(req, max_new, logprobs, i) for i in range(req.n)]
    guides = await _guides(req, ctx)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    record.request_id = rid
    record.prompt_tokens = len(ids)
    jobs = [(ids, cfg, f"{rid}-{i}", guide) for i, (cfg, guide) in enumerate(zip(configs, guides, strict=True))]
    choices = [Choice(i) for i in range(req.n)]
    slot = ctx.acquire([job[2] for job in jobs])
    if req.stream:
        return EventStreamResponse(
            _events(req, ctx, rid, jobs, choices, arrival, record), on_close=closer(slot, record, choices)
        )
    try:
        return await run_unless_disconnected(request, _collect(req, ctx, rid, jobs, choices, arrival, record))
    finally:
        closer(slot, record, choices)()


async def _collect(req, ctx, rid, jobs, choices: list[Choice], arrival, record) -> ChatCompletionResponse:
    await collect_outputs(ctx, jobs, choices, arrival, record, "messages")
    result = [
        ChatChoice(
            index=c.index,
            message=AssistantMessage(content="".join(c.text)),
            logprobs=_logprobs(ctx, c.logprobs) if req.logprobs else None,
            finish_reason=c.finish_reason,
        )
        for c in choices
    ]
    return ChatCompletionResponse(id=rid, model=req.model, choices=result, usage=record.usage())


async def _events(req, ctx, rid, jobs, choices: list[Choice], arrival, record) -> AsyncIterator[str]:
    created = int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(index: int, delta: dict, logprobs: ChatLogprobs | None = None, finish: str | None = None) -> str:
        body = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": req.model,
            "choices": [
                {
                    "index": index,
                    "delta": delta,
                    "logprobs": logprobs.model_dump() if logprobs is not None else None,
                    "finish_reason": finish,
                }
            ],
        }
        if include_usage:
            body["usage"] = None
        return sse(body)

    try:
        for c in choices:
            yield chunk(c.index, {"role": "assistant", "content": ""})
        async with contextlib.aclosing(observed_outputs(ctx, jobs, choices, arrival, record)) as outputs:
            async for i, out in outputs:
                lp = _logprobs(ctx, out.logprobs) if req.logprobs and out.logprobs else None
                if out.text or lp is not None:
                    yield chunk(i, {"content": out.text}, lp)
                if out.finish_reason is not None:
                    yield chunk(i, {}, None, out.finish_reason)
        ctx.metrics.e2e.observe(time.perf_counter() - arrival)
        if include_usage:
            yield sse(
                {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": req.model,
                    "choices": [],
                    "usage": record.usage().model_dump(),
                }
            )
    except APIError as e:
        yield sse(e.body())
    except Exception as e:
        yield sse(engine_error(e, "messages").body())
    yield SSE_DONE
