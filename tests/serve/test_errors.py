"""Errors the OpenAI way, in process (httpx ASGI transport over the fake engine): status, type, param and code."""

from __future__ import annotations

import asyncio

import pytest

from lmforge.serve.app import build_app

from .conftest import asgi_client

pytestmark = pytest.mark.anyio
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def error_of(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


async def test_unknown_model_is_404(fake_engine):
    async with asgi_client(build_app(fake_engine)) as c:
        err = error_of(await c.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4"}), 404)
        assert err["code"] == "model_not_found" and err["param"] == "model" and "gpt-4" in err["message"]
        err = error_of(await c.get("/v1/models/gpt-4"), 404)
        assert (await c.get("/v1/models/fake-model")).json()["id"] == "fake-model"


async def test_context_length_error_names_both_numbers(fake_engine):
    async with asgi_client(build_app(fake_engine)) as c:
        err = error_of(
            await c.post("/v1/completions", json={"model": "fake-model", "prompt": [5] * 250, "max_tokens": 10}), 400
        )
        assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
        assert "256" in err["message"] and "260" in err["message"]
        long_chat = {**CHAT, "messages": [{"role": "user", "content": "Paris " * 400}], "max_tokens": None}
        err = error_of(await c.post("/v1/chat/completions", json=long_chat), 400)
        assert err["code"] == "context_length_exceeded" and err["param"] == "messages"


@pytest.mark.parametrize(
    "patch, param",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"top_logprobs": 99, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs=true
        ({"stop": [""]}, "stop"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"min_tokens": 9}, "min_tokens"),  # more than max_tokens
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/x"}}}},
            "response_format",
        ),
    ],
)
async def test_invalid_parameters_are_400(fake_engine, patch, param):
    async with asgi_client(build_app(fake_engine)) as c:
        err = error_of(await c.post("/v1/chat/completions", json={**CHAT, **patch}), 400)
        assert err["type"] == "invalid_request_error" and err["param"] == param, err


@pytest.mark.parametrize("prompt", [[], "", [[]], [-1], [10**6]])
async def test_bad_prompts_are_400(fake_engine, prompt):
    async with asgi_client(build_app(fake_engine)) as c:
        err = error_of(await c.post("/v1/completions", json={"model": "fake-model", "prompt": prompt}), 400)
        assert err["param"] == "prompt"


async def test_malformed_json_and_wrong_types(fake_engine):
    async with asgi_client(build_app(fake_engine)) as c:
        err = error_of(
            await c.post(
                "/v1/chat/completions",
                content=b'{"model": "fake-model", ',
                headers={"content-type": "application/json"},
            ),
            400,
        )
        assert err["code"] == "invalid_json"
        err = error_of(
            await c.post("/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"}), 400
        )
        err = error_of(await c.post("/v1/completions", json={"model": "fake-model"}), 400)
        assert err["param"] == "prompt"
        err = error_of(await c.get("/v1/nothing-here"), 404)
        assert "/v1/nothing-here" in err["message"]
        error_of(await c.get("/v1/chat/completions"), 405)


async def test_api_keys(fake_engine):
    app = build_app(fake_engine, api_keys=["k1", "k2"])
    async with asgi_client(app) as c:
        err = error_of(await c.get("/v1/models"), 401)
        assert err["code"] == "missing_api_key"
        err = error_of(await c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"}), 401)
        assert err["code"] == "invalid_api_key"
        # checked before the body is parsed: a bad key on malformed JSON is still a 401
        error_of(await c.post("/v1/chat/completions", content=b"{", headers={"Authorization": "Bearer x"}), 401)
        ok = await c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer k2"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"
        # the chat page, its assets and /health stay open: the page asks for the key itself (tests/serve/test_auth.py
        # covers every route)
        for path in ("/", "/static/chat.js", "/health"):
            assert (await c.get(path)).status_code == 200, path


async def test_too_many_concurrent_requests_is_429(fake_engine):
    fake_engine.token_delay = 0.05
    app = build_app(fake_engine, max_concurrent_requests=2)
    async with asgi_client(app) as c:
        body = {**CHAT, "max_tokens": 10, "ignore_eos": True}
        results = await asyncio.gather(*[c.post("/v1/chat/completions", json=body) for _ in range(4)])
        codes = sorted(r.status_code for r in results)
        assert codes == [200, 200, 429, 429], codes
        err = error_of(next(r for r in results if r.status_code == 429), 429)
        assert err["code"] == "rate_limit_exceeded"
        # the slots come back: the next request is admitted
        assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
        assert app.state.ctx.num_in_flight == 0


async def test_engine_failure_mid_request(fake_engine):
    fake_engine.fail_after = 2
    async with asgi_client(build_app(fake_engine)) as c:
        body = {**CHAT, "max_tokens": 10, "ignore_eos": True}
        err = error_of(await c.post("/v1/chat/completions", json=body), 500)
        assert err["type"] == "server_error" and "injected failure" in err["message"]
        resp = await c.post("/v1/chat/completions", json={**body, "stream": True})
        events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "injected failure" in events[-2] and '"error"' in events[-2]


async def test_health_reflects_the_engine(fake_engine):
    async with asgi_client(build_app(fake_engine)) as c:
        assert (await c.get("/health")).json() == {"status": "ok"}
        fake_engine.is_healthy = lambda: False
        err = error_of(await c.get("/health"), 503)
        assert err["code"] == "engine_dead"
