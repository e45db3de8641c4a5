"""Offline batch API: `pipe = pipeline(model_path)`; `pipe(prompts)`; `pipe.stream_infer(prompts)`.

A prompt is a str, an OpenAI-style message list (the chat template is applied), or a list of
token ids; a batch is a list of those. Runs the Engine loop in the calling thread. A request that
fails inside the engine raises GenerationError with the engine's cause.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from lmforge.engine.engine import Engine
from lmforge.engine.outputs import RequestOutput
from lmforge.messages import GenerationConfig, PytorchEngineConfig, Response

Prompt = str | list[dict] | list[int]


class GenerationError(RuntimeError):
    """A request failed inside the engine (a model error, a failed guide): the message is the engine's cause."""


def _is_single(prompts: Any) -> bool:
    if isinstance(prompts, str):
        return True
    if isinstance(prompts, list) and prompts:
        first = prompts[0]
        return isinstance(first, dict) or isinstance(first, int)
    return False


class Pipeline:
    def __init__(self, model_path: str | None = None, backend_config: PytorchEngineConfig | None = None):
        self.engine = Engine(model_path, backend_config)
        self.tokenizer = self.engine.tokenizer

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if self.tokenizer is None:
            raise ValueError("this model folder has no tokenizer files: give prompts as lists of token ids")
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            return self.tokenizer.encode_chat(prompt)
        raise TypeError(f"a prompt is a str, a list of chat messages or a list of token ids, not {type(prompt)}")

    def _submit(self, prompts: list[Prompt], gen_config: GenerationConfig) -> list[tuple[str, int, int]]:
        """Add every (prompt, sample) request; returns (request_id, prompt index, sample index) in order."""
        encoded = [self.encode(p) for p in prompts]  # encode (and validate) all before adding any
        for ids in encoded:
            self.engine.validate_request(ids, gen_config)
        requests = []
        for i, ids in enumerate(encoded):
            for k in range(gen_config.n):
                cfg = gen_config
                if gen_config.n > 1 and gen_config.random_seed is not None:
                    cfg = dataclasses.replace(gen_config, random_seed=gen_config.random_seed + k)
                requests.append((self.engine.add_request(ids, cfg), i, k))
        return requests

    def _run(self, requests) -> Iterator[tuple[int, int, RequestOutput]]:
        where = {rid: (i, k) for rid, i, k in requests}
        remaining = set(where)
        try:
            while remaining:
                for out in self.engine.step():
                    if out.request_id in where:
                        if out.finish_reason is not None:
                            remaining.discard(out.request_id)
                        if out.finish_reason == "error":  # the other requests are aborted on the way out
                            i, k = where[out.request_id]
                            raise GenerationError(f"prompt {i} (sample {k}) failed in the engine: {out.error}")
                        yield (*where[out.request_id], out)
        finally:  # an abandoned generator must not leave its requests holding KV blocks
            for rid in remaining:
                self.engine.abort(rid)

    def __call__(
        self, prompts: Prompt | list[Prompt], gen_config: GenerationConfig | None = None
    ) -> Response | list[Response]:
        single = _is_single(prompts)
        batch = [prompts] if single else list(prompts)
        gen_config = gen_config or GenerationConfig()
        requests = self._submit(batch, gen_config)
        results = {
            (i, k): Response("", 0, 0, None, [], [] if gen_config.logprobs is not None else None, k)
            for _, i, k in requests
        }
        for i, k, out in self._run(requests):
            _merge(results[(i, k)], out)
        responses = [results[(i, k)] for _, i, k in requests]
        return responses[0] if single and gen_config.n == 1 else responses

    def stream_infer(
        self, prompts: Prompt | list[Prompt], gen_config: GenerationConfig | None = None
    ) -> Iterator[Response]:
        """Yield deltas as they are generated; Response.index is the prompt's position (times n, plus the sample)."""
        batch = [prompts] if _is_single(prompts) else list(prompts)
        gen_config = gen_config or GenerationConfig()
        requests = self._submit(batch, gen_config)
        for i, k, out in self._run(requests):
            yield Response(
                out.text,
                out.num_generated_tokens,
                out.num_prompt_tokens,
                out.finish_reason,
                list(out.token_ids),
                _logprobs(out),
                i * gen_config.n + k,
            )

    def close(self) -> None:
        """Abort what is in flight and stop the engine's tensor-parallel workers, if any."""
        for rid in list(self.engine._requests):
            self.engine.abort(rid)
        self.engine.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _logprobs(out: RequestOutput) -> list[dict[int, float]] | None:
    if out.logprobs is None:
        return None
    return [{lp.token_id: lp.logprob, **dict(lp.top)} for lp in out.logprobs]


def _merge(resp: Response, out: RequestOutput) -> None:
    resp.text += out.text
    resp.token_ids.extend(out.token_ids)
    resp.generate_token_len = out.num_generated_tokens
    resp.input_token_len = out.num_prompt_tokens
    resp.finish_reason = out.finish_reason
    if out.logprobs is not None and resp.logprobs is not None:
        resp.logprobs.extend(_logprobs(out))


def pipeline(model_path: str | None = None, backend_config: PytorchEngineConfig | None = None) -> Pipeline:
    """Build a Pipeline; `model_path=None` serves the embedded SmolLM2-135M-Instruct."""
    return Pipeline(model_path, backend_config)
