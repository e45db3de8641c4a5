"""The official `openai` client against the real `lmforge serve` process (real engine, tiny random Llama):
completions and chat, streamed and not, n>1, logprobs, stop, seed reproducibility, json_schema, usage, metrics,
a client that leaves mid-stream, and (last, since it stops the server) shutdown on SIGTERM."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import jsonschema
import openai
import pytest

from .conftest import REPO, TINY_SERVER_ARGS, ServerProcess

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
        "capital": {"type": "boolean"},
        "kind": {"enum": ["city", "town", "village"]},
    },
    "required": ["city", "population", "capital", "kind"],
    "additionalProperties": False,
}
MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir):
    server = ServerProcess([tiny_model_dir, *TINY_SERVER_ARGS], api_key="test-key")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.base_url + "/v1", api_key=tiny_server.api_key, max_retries=0, timeout=60)


def test_models_and_auth(client, tiny_server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    bad = openai.OpenAI(base_url=tiny_server.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert err.value.body["code"] == "model_not_found"


def test_completion_stream_matches_non_stream(client):
    kw = dict(
        model="tiny", prompt="The capital of France is", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    full = client.completions.create(**kw)
    choice = full.choices[0]
    assert choice.finish_reason == "length" and full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12 and full.usage.prompt_tokens > 0
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    echo = client.completions.create(**kw, echo=True)
    assert echo.choices[0].text == "The capital of France is" + choice.text


def test_chat_stream_matches_non_stream(client):
    kw = dict(model="tiny", messages=MESSAGES, max_completion_tokens=16, temperature=0)
    full = client.chat.completions.create(**kw)
    msg = full.choices[0].message
    assert msg.role == "assistant" and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens >= 1 and full.object == "chat.completion"
    stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    without_usage = list(client.chat.completions.create(**kw, stream=True))
    assert all(c.usage is None for c in without_usage)


def test_n_choices_and_seed_reproducibility(client):
    kw = dict(
        model="tiny", messages=MESSAGES, max_tokens=10, temperature=1.0, n=3, seed=1234, extra_body={"ignore_eos": True}
    )
    first = client.chat.completions.create(**kw)
    again = client.chat.completions.create(**kw)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1, "choices of one request share a seed"
    other = client.chat.completions.create(**{**kw, "seed": 99, "n": 1})
    assert other.choices[0].message.content != texts[0]
    assert first.usage.completion_tokens == 30
    # streamed n>1: every choice gets its own deltas and its own finish
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = [
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        for i in range(3)
    ]
    assert streamed == texts
    batch = client.completions.create(
        model="tiny", prompt=["Hello", "The capital"], max_tokens=4, n=2, temperature=0, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text and batch.usage.completion_tokens == 16


def test_logprobs(client):
    chat = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 6
    for tok in content:
        assert tok.logprob <= 0 and len(tok.top_logprobs) == 3
        assert tok.top_logprobs[0].token == tok.token  # greedy picks the most likely token
        assert tok.top_logprobs[0].logprob == pytest.approx(tok.logprob, abs=1e-4)
        assert [t.logprob for t in tok.top_logprobs] == sorted((t.logprob for t in tok.top_logprobs), reverse=True)
    comp = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=5, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset == sorted(lp.text_offset)


def test_stop_strings(client):
    kw = dict(
        model="tiny", prompt="The capital of France is", max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
    )
    text = client.completions.create(**kw).choices[0].text
    match = re.search(r"[A-Za-z]{2,}", text[3:])
    assert match, f"no word to stop at in {text!r}"
    stop = match.group(0)
    stopped = client.completions.create(**kw, stop=[stop, "\u2603never"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)] and stop not in stopped.choices[0].text


def test_json_schema_output_validates(client):
    for seed in (1, 2):
        resp = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Describe Paris as JSON."}],
            max_tokens=120,
            temperature=1.0,
            seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}},
        )
        assert resp.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(resp.choices[0].message.content), SCHEMA)


def test_metrics_after_traffic(tiny_server, client):
    client.completions.create(model="tiny", prompt="Hi", max_tokens=3, extra_body={"ignore_eos": True})
    text = httpx.get(tiny_server.base_url + "/metrics", headers=tiny_server.headers()).text
    for name in (
        "lmforge_num_requests_running",
        "lmforge_num_requests_waiting",
        "lmforge_kv_cache_usage_ratio",
        "lmforge_prompt_tokens_total",
        "lmforge_generation_tokens_total",
        "lmforge_time_to_first_token_seconds_bucket",
        "lmforge_inter_token_latency_seconds_bucket",
    ):
        assert name in text, name
    assert tiny_server.metric("lmforge_generation_tokens_total") >= 3
    assert tiny_server.metric("lmforge_time_to_first_token_seconds_count") >= 1


def test_disconnect_frees_blocks_at_once(tiny_server):
    total = tiny_server.metric("lmforge_kv_cache_total_blocks")
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": 400,
        "stream": True,
        "n": 2,
        "ignore_eos": True,
    }
    with httpx.Client(base_url=tiny_server.base_url, headers=tiny_server.headers(), timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            for i, _ in enumerate(resp.iter_lines()):
                if i == 20:
                    assert tiny_server.metric("lmforge_num_requests_running") == 2
                    assert tiny_server.metric("lmforge_kv_cache_free_blocks") < total
                    break
    start = time.monotonic()
    while (
        tiny_server.metric("lmforge_kv_cache_free_blocks") < total
        or tiny_server.metric("lmforge_num_requests_running") > 0
    ):
        assert time.monotonic() - start < 1.0, "blocks were not freed within a second"
        time.sleep(0.02)
    assert any("unfinished" in line and "chatcmpl-" in line for line in tiny_server.lines)


def test_200_concurrent_streams_with_hang_ups(tiny_server):
    """benchmarks/serve_load.py against this server: 200 clients at once, a fifth of them leave mid-stream; it
    exits non-zero on any failed request or on KV blocks missing from the free pool afterwards."""
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "serve_load.py"),
        "--url",
        tiny_server.base_url,
        "--api-key",
        tiny_server.api_key,
        "--model-name",
        "tiny",
        "--requests",
        "200",
        "--concurrency",
        "200",
        "--rounds",
        "1",
        "--max-tokens",
        "4",
        "--disconnect-fraction",
        "0.2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert summary["errors"] == 0 and summary["ok"] + summary["disconnected"] == 200 and summary["disconnected"] > 0
    assert summary["free_blocks_after"] == summary["total_blocks"]


def test_request_log_and_sigterm_shutdown(tiny_server):
    """SIGTERM with two streams in flight (--shutdown-timeout 5): the short one finishes, the long one
    (4000 tokens) is aborted but still ends cleanly (finish_reason 'abort', [DONE]), and the process exits 0."""
    events: dict[str, list[dict | str]] = {"short": [], "long": []}
    num_tokens = {"short": 0, "long": 0}
    started = {"short": threading.Event(), "long": threading.Event()}
    assert httpx.get(tiny_server.base_url + "/v1/models").status_code == 401  # logged too

    def stream(name: str, max_tokens: int) -> None:
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        body["logprobs"] = 0  # each chunk lists its tokens, so they can be counted
        with httpx.Client(base_url=tiny_server.base_url, headers=tiny_server.headers(), timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=body) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        event = line[6:] if line == "data: [DONE]" else json.loads(line[6:])
                        events[name].append(event)
                        if isinstance(event, dict) and event["choices"][0].get("logprobs"):
                            num_tokens[name] += len(event["choices"][0]["logprobs"]["tokens"])
                        started[name].set()

    # The signal goes out while the short stream still has about half a second of tokens to go at the speed it
    # runs right then, beside the long one, under this machine's current load. (Sizing it by a speed measured
    # earlier, alone, made it miss the 5 s grace on a busy machine.) The server counts the requests in flight
    # when the signal arrives, so the one that finishes after it is counted however fast that happens.
    start = time.monotonic()
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 16, "ignore_eos": True, "user": "alice\nFAKE LINE"}
    resp = httpx.post(tiny_server.base_url + "/v1/completions", json=body, headers=tiny_server.headers(), timeout=60)
    assert resp.is_success
    short = min(max(int(2 * 16 / (time.monotonic() - start)), 24), 2000)  # ~2 s alone, more beside the long one
    threads = [threading.Thread(target=stream, args=(name, n)) for name, n in (("short", short), ("long", 4000))]
    for t in threads:
        t.start()
    assert started["short"].wait(120) and started["long"].wait(120)  # guards a hang only
    t0, n0 = time.monotonic(), num_tokens["short"]
    time.sleep(0.3)
    rate = (num_tokens["short"] - n0) / (time.monotonic() - t0)
    while num_tokens["short"] < short - max(rate * 0.5, 3) and threads[0].is_alive():
        time.sleep(0.002)
    assert threads[0].is_alive(), "the short stream ended before the signal was sent"
    start = time.monotonic()
    assert tiny_server.stop(signal.SIGTERM) == 0
    took = time.monotonic() - start
    for t in threads:
        t.join(10)
    assert events["short"][-1] == "[DONE]" and events["short"][-2]["choices"][0]["finish_reason"] == "length"
    assert events["long"][-1] == "[DONE]" and events["long"][-2]["choices"][0]["finish_reason"] == "abort"
    assert 4.5 < took < 60, took  # waited the 5 s grace, then aborted (the bound guards a hang, not speed)
    log = "".join(tiny_server.lines)
    assert "waiting up to 5.0 s for 2 request(s) in flight" in log and "aborted 1 request(s)" in log, log[-3000:]
    assert "shut down" in log and "Traceback" not in log
    # one line per request: id, method, path, status, tokens in and out, finish, latency
    assert re.search(rf"cmpl-\w+ POST /v1/completions 200 in=\d+ out={short} finish=length \d+\.\d+s", log)
    assert re.search(r"cmpl-\w+ POST /v1/completions 200 in=\d+ out=\d+ finish=abort ", log)
    # OpenAI's `user` label is logged (escaped: it cannot forge a log line), not dropped
    assert re.search(r"out=16 finish=length \d+\.\d+s user='alice\\nFAKE LINE'", log), log[-3000:]
    assert "\nFAKE LINE" not in log
    assert re.search(r"- GET /v1/models 401 in=0 out=0", log)
