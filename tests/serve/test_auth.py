"""What a server exposes: the key matrix over every route (--api-keys, --metrics-key), --allowed-hosts, the warning
for a public bind without keys, and the port taken before the model loads."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest

from lmforge.serve.app import build_app
from lmforge.serve.server import exposure_warning, serve_async

from .conftest import asgi_client, free_port

pytestmark = pytest.mark.anyio
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
OPEN = ("/health", "/", "/static/chat.js")


def routes(app) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, docs included, with path parameters filled in."""
    out = []
    for route in app.routes:
        path = getattr(route, "path", None)
        if path is None or path == "/static":
            continue
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method != "HEAD":
                out.append((method, path.replace("{model:path}", "fake-model")))
    return out


async def call(c, method: str, path: str, key: str | None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if method == "POST":
        body = CHAT if "chat" in path else {"model": "fake-model", "prompt": "Hi", "max_tokens": 2}
        return await c.post(path, json=body, headers=headers)
    return await c.request(method, path, headers=headers)


async def test_key_matrix_over_every_route(fake_engine):
    app = build_app(fake_engine, api_keys=["api-key"], metrics_key="scrape-key")
    table = routes(app)
    paths = {p for _, p in table}
    # the matrix really covers the API, the docs and the probes
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions", "/metrics", "/health"} <= paths
    assert {"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"} <= paths
    async with asgi_client(app) as c:
        for method, path in [*table, ("GET", "/static/chat.js")]:
            if path in OPEN:
                for key in (None, "wrong"):
                    assert (await call(c, method, path, key)).status_code == 200, (path, key)
                continue
            good, other = ("scrape-key", "api-key") if path == "/metrics" else ("api-key", "scrape-key")
            for key in (None, "wrong", other):
                r = await call(c, method, path, key)
                assert r.status_code == 401, (method, path, key, r.status_code)
                assert r.json()["error"]["code"] in ("missing_api_key", "invalid_api_key")
            r = await call(c, method, path, good)
            assert r.status_code == 200, (method, path, r.status_code, r.text[:200])


async def test_metrics_take_the_api_keys_without_a_metrics_key(fake_engine):
    async with asgi_client(build_app(fake_engine, api_keys=["k"])) as c:
        assert (await c.get("/metrics")).status_code == 401
        assert (await c.get("/metrics", headers={"Authorization": "Bearer k"})).status_code == 200
        assert (await c.get("/docs")).status_code == 401
    # control: without keys everything is open (the default on loopback)
    async with asgi_client(build_app(fake_engine)) as c:
        for path in ("/metrics", "/docs", "/openapi.json", "/v1/models"):
            assert (await c.get(path)).status_code == 200, path


async def test_metrics_key_alone_guards_only_metrics(fake_engine):
    async with asgi_client(build_app(fake_engine, metrics_key="m")) as c:
        assert (await c.get("/metrics")).status_code == 401
        assert (await c.get("/metrics", headers={"Authorization": "Bearer m"})).status_code == 200
        assert (await c.get("/v1/models")).status_code == 200


async def test_allowed_hosts(fake_engine):
    app = build_app(fake_engine, allowed_hosts=["api.example.com", "*.internal", "127.0.0.1"])
    async with asgi_client(app) as c:
        for host in ("api.example.com", "api.example.com:8000", "a.b.internal", "127.0.0.1:23333"):
            assert (await c.get("/health", headers={"Host": host})).status_code == 200, host
        for host in ("evil.com", "api.example.com.evil.com", "internal", "localhost"):
            r = await c.get("/health", headers={"Host": host})
            assert r.status_code == 400, host
            assert r.json()["error"]["code"] == "invalid_host" and host in r.json()["error"]["message"]
    # control: without --allowed-hosts any Host is served
    async with asgi_client(build_app(fake_engine)) as c:
        assert (await c.get("/health", headers={"Host": "evil.com"})).status_code == 200


def test_exposure_warning():
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com"):
        warning = exposure_warning(host, None)
        assert warning and "WITHOUT API keys" in warning and host in warning
        assert exposure_warning(host, ["k"]) is None
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert exposure_warning(host, None) is None


class Loaded(Exception):
    pass


def test_busy_port_fails_before_the_model_loads(caplog):
    calls = []

    def factory():
        calls.append(time.perf_counter())
        raise Loaded

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            asyncio.run(serve_async(factory, host="127.0.0.1", port=port))
    assert not calls
    # control: on a free port the engine factory runs (and its failure is the one reported)
    with pytest.raises(Loaded):
        asyncio.run(serve_async(factory, host="127.0.0.1", port=free_port()))
    assert len(calls) == 1


def test_public_bind_without_keys_warns(caplog, monkeypatch):
    import lmforge.serve.server as server

    def factory():
        raise Loaded

    # tests bind loopback only: the socket is taken on 127.0.0.1 whatever host the server is told
    monkeypatch.setattr(server, "bind_socket", lambda host, port: server.socket.create_server(("127.0.0.1", 0)))

    with caplog.at_level(logging.WARNING, logger="lmforge.serve"), pytest.raises(Loaded):
        asyncio.run(serve_async(factory, host="0.0.0.0", port=free_port()))
    assert any("SECURITY WARNING" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmforge.serve"), pytest.raises(Loaded):
        asyncio.run(serve_async(factory, host="0.0.0.0", port=free_port(), api_keys=["k"]))
    assert not any("SECURITY WARNING" in r.getMessage() for r in caplog.records)
