"""A client that goes away mid-request aborts its engine request and frees its KV blocks at once (live uvicorn,
fake engine with a slow, fixed token rate so the timing is under the test's control)."""

from __future__ import annotations

import socket
import time

import httpx

BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "ignore_eos": True}


def wait_for(predicate, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)
    return time.monotonic() - start


def test_stream_disconnect_aborts_and_frees_blocks(live_fake, fake_engine):
    fake_engine.token_delay = 0.02  # 200 tokens would take 4 s
    total = fake_engine.num_blocks
    with httpx.Client(base_url=live_fake.base_url, timeout=10) as client:
        with client.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True, "n": 3}) as resp:
            assert resp.status_code == 200
            events = 0
            for line in resp.iter_lines():
                events += line.startswith("data: {")
                if events >= 9:  # 3 role chunks, then a few tokens
                    wait_for(lambda: fake_engine.num_running == 3)
                    assert fake_engine.free_blocks < total
                    break  # httpx closes the connection when its line iterator is closed: mid-stream
    took = wait_for(lambda: fake_engine.free_blocks == total and fake_engine.num_running == 0)
    assert took < 2.0, took  # at once, not when the 200 tokens would have finished (4 s)
    assert len(fake_engine.aborted) == 3
    assert live_fake.app.state.ctx.num_in_flight == 0


def test_non_stream_disconnect_aborts(live_fake, fake_engine):
    fake_engine.token_delay = 0.02
    total = fake_engine.num_blocks
    body = b'{"model": "fake-model", "prompt": "hello", "max_tokens": 200, "ignore_eos": true}'
    with socket.create_connection(("127.0.0.1", live_fake.port)) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        wait_for(lambda: fake_engine.num_running == 1)
    took = wait_for(lambda: fake_engine.free_blocks == total and fake_engine.num_running == 0)
    assert took < 2.0 and len(fake_engine.aborted) == 1
    wait_for(lambda: live_fake.app.state.ctx.num_in_flight == 0)


def test_finished_stream_is_not_aborted(live_fake, fake_engine):
    with httpx.Client(base_url=live_fake.base_url, timeout=10) as client:
        resp = client.post("/v1/chat/completions", json={**BODY, "max_tokens": 5, "stream": True})
        assert resp.text.endswith("data: [DONE]\n\n")
    assert fake_engine.aborted == [] and fake_engine.free_blocks == fake_engine.num_blocks
