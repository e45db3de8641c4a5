"""Prompt work kept off the event loop: tokenization, chat templating and grammar compiling run in a small thread
pool (HF tokenizers release the GIL while they encode; jinja and xgrammar at least yield it), so one big request
never stalls /health or other clients' streams.

Before that work starts, `check_prompt_chars` rejects prompts that cannot fit the context whatever they tokenize
to: a token covers at most `max_token_chars` characters, so a text longer than session_len * max_token_chars has
more than session_len tokens.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from .errors import APIError

T = TypeVar("T")

NUM_PROMPT_THREADS = 2  # more would only compete with the engine for the CPU


def max_token_chars(tokenizer) -> int:
    """An upper bound on the characters one token stands for: the longest vocabulary entry or added token.

    Vocabulary strings are at least as long as their text (byte-level BPE spells each byte as one character;
    SentencePiece's '▁' is one space; '<0x0A>' byte tokens are longer than their byte).
    """
    hf = getattr(tokenizer, "hf", tokenizer)
    longest = max((len(t) for t in hf.get_vocab()), default=1)
    added = getattr(hf, "added_tokens_decoder", {}) or {}
    longest = max([longest, *(len(t.content) for t in added.values())])
    return max(longest, 1)


def check_prompt_chars(num_chars: int, session_len: int, chars_per_token: Callable[[], int], param: str) -> None:
    """Refuse, before tokenizing, a text whose length alone proves it exceeds the context.

    `chars_per_token()` (max_token_chars, cached by the caller) is only asked for texts longer than the context.
    """
    if num_chars <= session_len:  # chars_per_token() >= 1, so such a text never fails the check below
        return
    chars_per_token = chars_per_token()
    limit = session_len * chars_per_token
    if num_chars > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {session_len} tokens, and no token of it spans more than "
            f"{chars_per_token} characters; your {param} has {num_chars} characters, so it cannot fit. "
            f"Please reduce the length of the {param}.",
            "invalid_request_error",
            param,
            "context_length_exceeded",
        )


class PromptWorkers:
    """The thread pool of one server (created lazily so building an app starts no threads)."""

    def __init__(self, num_threads: int = NUM_PROMPT_THREADS):
        self.num_threads = num_threads
        self._pool: ThreadPoolExecutor | None = None

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="lmforge-prompt")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
