"""The guided-decoding bomb suite: schemas that would take the compiler minutes (huge enums, thousands of
properties, deep nesting, megabytes) are 400s before compiling; a compile past its budget is a 400; the compiler
cache is bounded; json_object only admits objects; errors carry no C++ source paths; n choices compile once."""

from __future__ import annotations

import json
import time

import pytest
import xgrammar as xgr

import lmforge.engine.guided as guided
import lmforge.serve.chat as chat
from lmforge.engine.guided_limits import DEFAULT_SCHEMA_LIMITS, SchemaLimits, check_schema
from lmforge.serve.app import build_app

from .conftest import TINY_VOCAB, asgi_client

pytestmark = pytest.mark.anyio


def schema_request(schema, n: int = 1) -> dict:
    return {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "Give JSON"}],
        "max_tokens": 4,
        "n": n,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }


def deep(depth: int) -> dict:
    node: dict = {"type": "integer"}
    for _ in range(depth):
        node = {"type": "object", "properties": {"x": node}, "required": ["x"]}
    return node


BOMBS = {
    "enum": ({"enum": [f"value {i}" for i in range(100_000)]}, "enum has 100000 entries"),
    "properties": ({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(5000)}}, "5000"),
    "depth": (deep(200), "deeper than 64"),
    "bytes": ({"type": "string", "description": "x" * 100_000}, "bytes"),
    "nodes": ({"type": "object", "properties": {f"p{i}": deep(5) for i in range(200)}}, "nodes"),
    "anyOf": ({"anyOf": [{"const": i} for i in range(5000)]}, "anyOf has 5000 entries"),
}


@pytest.mark.parametrize("name", sorted(BOMBS))
async def test_schema_bombs_are_400_before_compiling(fake_engine, name, monkeypatch):
    schema, expected = BOMBS[name]
    compiles = []
    real = guided.compile_response_format
    monkeypatch.setattr(chat, "compile_response_format", lambda *a, **k: compiles.append(1) or real(*a, **k))
    async with asgi_client(build_app(fake_engine, "fake-model")) as c:
        start = time.perf_counter()
        r = await c.post("/v1/chat/completions", json=schema_request(schema, n=16))
        elapsed = time.perf_counter() - start
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert error["param"] == "response_format" and expected in error["message"], error
    assert elapsed < 10, elapsed  # the issue measured 129 s (enum) and 167 s (n=16 x 5,000 properties)


def test_deeply_nested_json_body_is_not_a_500():
    # Python's JSON parser recurses: a body nested 100k deep must fail as a 400, not a RecursionError.
    with pytest.raises(ValueError, match="deeper"):
        check_schema(json.loads("[" * 500 + "]" * 500))


async def test_deeply_nested_request_body_is_400(fake_engine):
    body = '{"model": "fake-model", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    async with asgi_client(build_app(fake_engine, "fake-model")) as c:
        r = await c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text[:300]


@pytest.mark.parametrize(
    "schema",
    [
        {"enum": [f"value {i}" for i in range(1000)]},
        {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(200)}, "required": ["p0"]},
        deep(30),  # 30 objects in objects: 61 levels of the document
    ],
    ids=["enum-1000", "properties-200", "depth-30"],
)
async def test_schemas_under_the_limits_are_served(fake_engine, schema):
    """Control: the same shapes within the limits compile and run."""
    async with asgi_client(build_app(fake_engine, "fake-model")) as c:
        r = await c.post("/v1/chat/completions", json=schema_request(schema))
    assert r.status_code == 200, r.text[:300]


async def test_compile_past_the_budget_is_400(fake_engine, monkeypatch):
    # 400 optional properties take xgrammar ~1 s to compile (well over a 1 ms budget, well under the default)
    schema = {"type": "object", "properties": {f"q{i}": {"type": "string"} for i in range(250)}}
    monkeypatch.setattr(chat, "DEFAULT_SCHEMA_LIMITS", SchemaLimits(compile_timeout=0.001))
    async with asgi_client(build_app(fake_engine, "fake-model")) as c:
        r = await c.post("/v1/chat/completions", json=schema_request(schema))
        assert r.status_code == 400, r.text[:300]
        assert "longer than 0.001 s to compile" in r.json()["error"]["message"]
        # control: under the default budget the same schema compiles and runs
        monkeypatch.setattr(chat, "DEFAULT_SCHEMA_LIMITS", DEFAULT_SCHEMA_LIMITS)
        schema["properties"]["extra"] = {"type": "integer"}  # not the (possibly) cached one
        r = await c.post("/v1/chat/completions", json=schema_request(schema))
        assert r.status_code == 200, r.text[:300]


async def test_n_choices_compile_once(fake_engine, monkeypatch):
    compiles = []
    real = guided.compile_response_format
    monkeypatch.setattr(chat, "compile_response_format", lambda *a, **k: compiles.append(1) or real(*a, **k))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    async with asgi_client(build_app(fake_engine, "fake-model")) as c:
        r = await c.post("/v1/chat/completions", json=schema_request(schema, n=4))
    assert r.status_code == 200 and len(r.json()["choices"]) == 4
    assert len(compiles) == 1


def test_compiler_cache_is_bounded(tokenizer, monkeypatch):
    monkeypatch.setattr(guided, "_COMPILERS", {})
    monkeypatch.setattr(guided, "COMPILER_CACHE_BYTES", 200_000)
    compiler = guided._compiler(tokenizer.hf, TINY_VOCAB, None)
    assert compiler.cache_limit_bytes == 200_000
    unbounded = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer.hf, vocab_size=TINY_VOCAB))
    for i in range(30):  # distinct schemas, ~50 KB of grammar each
        schema = json.dumps({"enum": [f"{i} value {j}" for j in range(300)]})
        compiler.compile_json_schema(schema)
        unbounded.compile_json_schema(schema)
    assert compiler.get_cache_size_bytes() <= 200_000
    assert unbounded.get_cache_size_bytes() > 200_000  # control: xgrammar's default cache keeps everything


def test_json_object_admits_only_objects(tokenizer):
    compiled, _ = guided.compile_response_format({"type": "json_object"}, tokenizer.hf, TINY_VOCAB)
    for text, ok in [('{"a": [1, {"b": null}]}', True), ("{}", True), ("[false]", False), ("42", False)]:
        matcher = xgr.GrammarMatcher(compiled)
        assert (matcher.accept_string(text) and matcher.is_completed()) == ok, text
    # control: xgrammar's builtin JSON grammar (what json_object used) accepts the issue's `[false]`
    info = xgr.TokenizerInfo.from_huggingface(tokenizer.hf, vocab_size=TINY_VOCAB)
    builtin = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_builtin_json_grammar())
    assert builtin.accept_string("[false]")


async def test_schema_errors_leak_no_source_paths(fake_engine, tokenizer):
    info = xgr.TokenizerInfo.from_huggingface(tokenizer.hf, vocab_size=TINY_VOCAB)
    with pytest.raises(RuntimeError, match=r"\.cc:\d+"):  # control: what xgrammar says
        xgr.GrammarCompiler(info).compile_json_schema('{"type": "foo"}')
    async with asgi_client(build_app(fake_engine, "fake-model")) as c:
        r = await c.post("/v1/chat/completions", json=schema_request({"type": "foo"}))
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert 'Unsupported type "foo"' in message and ".cc" not in message and "/project" not in message, message
