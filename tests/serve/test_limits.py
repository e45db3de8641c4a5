"""Hostile-client limits: body size before parsing, prompt work off the event loop, body and header read timeouts
(slowloris), the connection cap. Each test has its control: the same client without the limit is served, or
held, the way issue 16 found it. Servers are loopback only; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from lmforge.serve.app import build_app
from lmforge.serve.connections import guarded_protocol
from lmforge.serve.limits import DEFAULT_MAX_REQUEST_BYTES, ServeLimits

from .conftest import LiveServer, asgi_client

pytestmark = pytest.mark.anyio
BIG = 50 * 2**20  # the 50 MB message
JSON = {"content-type": "application/json"}


def chat_body(content: str) -> bytes:
    return json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": content}]}).encode()


def raw_request(port: int, head: bytes, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(head)
    return sock


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """(status, body) of the response on `sock`; the server closes the connection after these errors."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            break
        if not chunk:
            break
        data += chunk
        if b"\r\n\r\n" in data:
            head, _, body = data.partition(b"\r\n\r\n")
            length = next((int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")[1:])
                           if k.strip().lower() == b"content-length"), None)  # fmt: skip
            if length is not None and len(body) >= length:
                break
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def post_head(path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def health_latency(base_url: str) -> float:
    start = time.perf_counter()
    assert httpx.get(base_url + "/health", timeout=10).status_code == 200
    return time.perf_counter() - start


def test_50mb_request_is_refused_before_it_is_read(fake_engine):
    body = chat_body("a" * BIG)
    server = LiveServer(build_app(fake_engine, "fake-model"))
    try:
        sock = raw_request(server.port, post_head("/v1/chat/completions", len(body)))
        sent = threading.Event()

        def send_body() -> None:  # the client keeps sending while the server answers
            try:
                sock.sendall(body[: 4 * 2**20])
            except OSError:
                pass
            sent.set()

        start = time.perf_counter()
        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        latencies = [health_latency(server.base_url) for _ in range(3)]
        status, reply = read_response(sock)
        elapsed = time.perf_counter() - start
        sock.close()
        sender.join(10)
        assert status == 413, reply
        error = json.loads(reply)["error"]
        assert error["code"] == "request_too_large" and str(DEFAULT_MAX_REQUEST_BYTES) in error["message"]
        assert max(latencies) < 0.5, latencies
        assert elapsed < 2.0, elapsed  # only the headers were needed (typically a few ms)
    finally:
        server.stop()


async def test_50mb_without_a_body_limit_is_read_but_refused_before_tokenizing(fake_engine):
    """Control: with no body limit the 50 MB body is read and parsed (the issue's stall); the character bound
    still refuses it before the tokenizer runs."""
    calls = []
    encode = fake_engine.tokenizer.hf.encode
    app = build_app(fake_engine, "fake-model", limits=ServeLimits(max_request_bytes=None))
    async with asgi_client(app) as c:
        fake_engine.tokenizer.hf.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)
        try:
            r = await c.post("/v1/chat/completions", content=chat_body("a" * BIG), headers=JSON)
        finally:
            del fake_engine.tokenizer.hf.encode
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert str(BIG) in error["message"]
    assert not calls  # the tokenizer never saw it


async def test_chunked_body_over_the_limit_is_413(fake_engine):
    app = build_app(fake_engine, "fake-model", limits=ServeLimits(max_request_bytes=1000))

    async def chunks():
        for _ in range(20):
            yield b" " * 100

    async with asgi_client(app) as c:
        r = await c.post(
            "/v1/chat/completions", content=chunks(), headers=JSON
        )  # no Content-Length: counted as it arrives
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        ok = await c.post("/v1/chat/completions", content=chat_body("Hi"), headers=JSON)  # control: a small body passes
        assert ok.status_code == 200, ok.text


class BlockingEncode:
    """Wraps a tokenizer's encode so it blocks (GIL released) until released: a stand-in for a slow prompt."""

    def __init__(self, hf):
        self.hf, self.encode = hf, hf.encode
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, *args, **kwargs):
        self.entered.set()
        assert self.release.wait(20), "never released"
        return self.encode(*args, **kwargs)


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
async def test_tokenization_runs_off_the_event_loop(fake_engine, endpoint):
    hf = fake_engine.tokenizer.hf
    blocker = BlockingEncode(hf)
    body = (
        chat_body("Hello world")
        if "chat" in endpoint
        else json.dumps({"model": "fake-model", "prompt": "Hello world", "max_tokens": 2}).encode()
    )
    app = build_app(fake_engine, "fake-model")
    hf.encode = blocker
    try:
        async with asgi_client(app) as c:
            slow = asyncio.create_task(c.post(endpoint, content=body, headers=JSON))
            assert await asyncio.to_thread(blocker.entered.wait, 20)
            start = time.perf_counter()
            health = await asyncio.wait_for(c.get("/health"), 10)  # on the old code this waits for the encode
            latency = time.perf_counter() - start
            assert health.status_code == 200 and not slow.done()  # the slow request is still tokenizing
            blocker.release.set()
            assert (await asyncio.wait_for(slow, 20)).status_code == 200
        assert latency < 0.5, latency
    finally:
        blocker.release.set()
        del hf.encode


def test_slow_body_gets_408(fake_engine):
    server = LiveServer(build_app(fake_engine, "fake-model", limits=ServeLimits(body_timeout=0.5)))
    try:
        body = chat_body("Hi")
        sock = raw_request(server.port, post_head("/v1/chat/completions", len(body)) + body[:5])
        status, reply = read_response(sock)  # the rest never comes
        sock.close()
        assert status == 408 and json.loads(reply)["error"]["code"] == "request_timeout"
        # control: the same body sent in time is answered
        sock = raw_request(server.port, post_head("/v1/chat/completions", len(body)) + body)
        status, reply = read_response(sock)
        sock.close()
        assert status == 200, reply
    finally:
        server.stop()


def test_without_body_timeout_a_slow_body_holds_the_connection(fake_engine):
    """Control of the above: without the timeout the server waits for the body (the issue's slowloris)."""
    server = LiveServer(build_app(fake_engine, "fake-model", limits=ServeLimits(body_timeout=None)))
    try:
        body = chat_body("Hi")
        sock = raw_request(server.port, post_head("/v1/chat/completions", len(body)) + body[:5], timeout=1.5)
        with pytest.raises(TimeoutError):
            sock.recv(100)  # nothing comes back while the body is incomplete
        sock.sendall(body[5:])  # and it is still served once the body arrives
        sock.settimeout(10)
        status, _ = read_response(sock)
        sock.close()
        assert status == 200
    finally:
        server.stop()


@pytest.fixture(params=["h11", "httptools"])
def http_impl(request) -> str:
    """Both of uvicorn's HTTP/1.1 protocols carry the limits (httptools is taken when it is installed)."""
    if request.param == "httptools":
        pytest.importorskip("httptools")
    return request.param


def guarded_server(fake_engine, header_timeout=None, max_connections=None, impl="h11") -> LiveServer:
    return LiveServer(
        build_app(fake_engine, "fake-model"),
        http=guarded_protocol(header_timeout, max_connections, impl),
        timeout_keep_alive=30,
    )


def test_slow_headers_get_408_and_are_closed(fake_engine, http_impl):
    server = guarded_server(fake_engine, header_timeout=0.5, impl=http_impl)
    try:
        sock = raw_request(server.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        status, reply = read_response(sock)
        assert status == 408 and json.loads(reply)["error"]["code"] == "request_timeout"
        assert sock.recv(10) == b""  # closed
        sock.close()
        # control: complete headers are served, and on a keep-alive connection the next request gets its own
        # deadline: a finished one is answered, one left hanging is timed out
        sock = raw_request(server.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, _ = read_response_keepalive(sock)
        assert status == 200
        time.sleep(0.7)  # past the header timeout: idle keep-alive time is not header time
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, _ = read_response_keepalive(sock)
        assert status == 200
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        status, _ = read_response(sock)
        assert status == 408
        sock.close()
    finally:
        server.stop()


def read_response_keepalive(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split(b" ")[1]), body


def test_without_header_timeout_slow_headers_hold_the_connection(fake_engine, http_impl):
    server = guarded_server(fake_engine, header_timeout=None, impl=http_impl)
    try:
        sock = raw_request(server.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n", timeout=1.5)
        with pytest.raises(TimeoutError):
            sock.recv(100)
        sock.close()
    finally:
        server.stop()


def wait_connections(server: LiveServer, num: int) -> None:
    deadline = time.monotonic() + 10
    while len(server.server.server_state.connections) != num:
        assert time.monotonic() < deadline, len(server.server.server_state.connections)
        time.sleep(0.01)


def test_connection_cap_answers_503(fake_engine, http_impl):
    server = guarded_server(fake_engine, max_connections=3, impl=http_impl)
    try:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(3)]
        wait_connections(server, 3)
        extra = raw_request(server.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, reply = read_response(extra)
        extra.close()
        assert status == 503
        error = json.loads(reply)["error"]
        assert error["code"] == "too_many_connections" and "at most 3" in error["message"]
        # control: once one idle connection goes, a new one is served
        idle.pop().close()
        wait_connections(server, 2)
        sock = raw_request(server.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        status, _ = read_response(sock)
        sock.close()
        assert status == 200
        for s in idle:
            s.close()
    finally:
        server.stop()


def test_serve_limits_reject_nonsense():
    with pytest.raises(ValueError, match="impl must be"):
        guarded_protocol(None, None, "http2")
    with pytest.raises(ValueError, match="max_request_bytes"):
        ServeLimits(max_request_bytes=0)
    with pytest.raises(ValueError, match="body_timeout"):
        ServeLimits(body_timeout=0)


async def test_token_id_prompts_are_length_checked_before_the_id_scan(fake_engine):
    app = build_app(fake_engine, "fake-model")
    async with asgi_client(app) as c:
        too_long = [10**9] * (fake_engine.session_len + 1)  # every id is bad, but the length decides first
        r = await c.post("/v1/completions", json={"model": "fake-model", "prompt": too_long})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        # control: a short list is scanned and its bad id named
        r = await c.post("/v1/completions", json={"model": "fake-model", "prompt": [1, 10**9]})
        assert r.status_code == 400 and "outside this model's vocabulary" in r.json()["error"]["message"]
