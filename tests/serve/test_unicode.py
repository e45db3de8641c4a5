"""Lone surrogates ("\\ud800" is valid JSON, not valid Unicode) in every text field: a 400 naming the field, never a
500, and error responses that always encode (the issue found 500s in the tokenizer and in the 404 for the model)."""

from __future__ import annotations

import json

import pytest

from lmforge.serve.app import build_app
from lmforge.serve.errors import model_not_found

from .conftest import asgi_client

pytestmark = pytest.mark.anyio
BAD = "ok\ud800ok"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}}}
CHAT = {
    "model": "fake-model",
    "messages": [
        {"role": "system", "content": "Be brief.", "name": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ],
    "stop": ["zz", "yy"],
    "user": "u1",
    "max_tokens": 3,
    "response_format": {"type": "json_schema", "json_schema": {"name": "r", "description": "d", "schema": SCHEMA}},
}
COMPLETION = {"model": "fake-model", "prompt": ["Hi", "there"], "stop": "zz", "user": "u1", "max_tokens": 3}


def string_paths(value, path=()):
    """Every string leaf of a JSON value (and every dict key), as paths; keys are marked ('key', name)."""
    if isinstance(value, str):
        yield path
    elif isinstance(value, dict):
        for k, v in value.items():
            yield (*path, ("key", k))
            yield from string_paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from string_paths(v, (*path, i))


def poisoned(body, path):
    """A copy of `body` with the string (or key) at `path` given a lone surrogate, and the param the server names."""
    body = json.loads(json.dumps(body))
    node = body
    for p in path[:-1]:
        node = node[p]
    last = path[-1]
    if isinstance(last, tuple):
        node[last[1] + BAD] = node.pop(last[1])
        names = [*path[:-1], (last[1] + BAD).encode("utf-8", "backslashreplace").decode()]
    else:
        node[last] = node[last] + BAD
        names = list(path)
    return body, ".".join(str(p) for p in names)


def send(c, path, body):
    # json.dumps escapes the surrogate as \ud800 (valid JSON text); httpx's json= would refuse to encode it
    return c.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def cases(base):
    """Every text value but the enum-typed role/type (pydantic rejects those itself), and the keys inside the
    free-form schema; keys of request objects are not text the server reads (unknown ones are ignored)."""
    for path in string_paths(base):
        last = path[-1]
        if isinstance(last, tuple):
            if path[:3] == ("response_format", "json_schema", "schema"):
                yield path
        elif last not in ("role", "type"):
            yield path


@pytest.mark.parametrize("endpoint,base", [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)])
async def test_lone_surrogate_in_any_text_field_is_400_naming_it(fake_engine, endpoint, base):
    app = build_app(fake_engine, "fake-model")
    async with asgi_client(app) as c:
        ok = await send(c, endpoint, base)  # control: the clean body is served
        assert ok.status_code == 200, ok.text
        paths = list(cases(base))
        assert len(paths) >= (10 if "chat" in endpoint else 5), paths
        for path in paths:
            body, param = poisoned(base, path)
            r = await send(c, endpoint, body)
            assert r.status_code == 400, (path, r.status_code, r.text[:300])
            error = r.json()["error"]
            assert error["code"] == "invalid_unicode" and error["param"] == param, (path, error)
            assert "surrogate" in error["message"]


async def test_role_and_type_enums_with_surrogates_are_400(fake_engine):
    app = build_app(fake_engine, "fake-model")
    async with asgi_client(app) as c:
        body = {**CHAT, "messages": [{"role": "user" + BAD, "content": "Hi"}]}
        r = await send(c, "/v1/chat/completions", body)
        assert r.status_code == 400
        assert "\\ud800" in r.text  # the validation error quotes the input, escaped


async def test_unknown_model_with_a_surrogate_answers_an_encodable_error(fake_engine):
    error = model_not_found("gpt\ud800", ["fake-model"])
    body = error.response().body  # the old code raised UnicodeEncodeError here
    assert b"gpt\\\\ud800" in body and json.loads(body)["error"]["code"] == "model_not_found"
    app = build_app(fake_engine, "fake-model")
    async with asgi_client(app) as c:
        r = await c.get("/v1/models/gpt%ED%A0%80")  # a surrogate's UTF-8 bytes in the path
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
