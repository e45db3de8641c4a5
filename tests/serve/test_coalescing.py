"""A front end that falls behind merges a stream's pending deltas into one (lmforge.serve.core_client): the text,
tokens, logprobs, finish reason and usage must be exactly what one-token deltas give, and what the tokenizer
decodes from the whole output at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading

import httpx
import pytest

from lmforge.engine.outputs import EngineStats, RequestOutput, TokenLogprob
from lmforge.messages import GenerationConfig
from lmforge.serve.core_client import EngineCoreClient, _RequestText, _Stream, merge_deltas

from .conftest import TINY_VOCAB

TEXT = "naïve café — 你好 🙂 the quick brown fox jumps over the lazy dog, Paris 3.14"
EOS = 2


def _ids(tokenizer) -> list[int]:
    return tokenizer.hf.encode(TEXT, add_special_tokens=False)


def _deltas(ids: list[int], finish: str) -> list[RequestOutput]:
    outs = []
    for i, t in enumerate(ids):
        lp = [TokenLogprob(t, -0.01 * i, [(t, -0.01 * i), (7, -3.0)])]
        outs.append(RequestOutput("r", "", [t], lp, finish if i == len(ids) - 1 else None, 4, i + 1))
    return outs


def _run(tokenizer, deltas, cfg, groups, window: bool) -> tuple[str, list[int], list, str, int]:
    """Feed `deltas` merged in groups of the given sizes (cycled); what the client would have seen in the end."""
    text = _RequestText(tokenizer, [5, 6, 7, 8], cfg, [EOS])
    if window:  # the tokenizer-window path of the Detokenizer, as for non-byte-level tokenizers
        text.detok._table = None
    parts, tokens, lps, k, i = [], [], [], 0, 0
    while i < len(deltas):
        n = groups[k % len(groups)]
        k += 1
        batch = [RequestOutput(d.request_id, d.text, list(d.token_ids), d.logprobs, d.finish_reason,
                               d.num_prompt_tokens, d.num_generated_tokens) for d in deltas[i : i + n]]  # fmt: skip
        i += n
        out = text.apply(merge_deltas(batch))
        parts.append(out.text)
        tokens += out.token_ids
        lps += [(lp.token_id, lp.logprob, lp.top) for lp in out.logprobs or ()]
        if out.finish_reason is not None:
            return "".join(parts), tokens, lps, out.finish_reason, out.num_generated_tokens
    raise AssertionError("no finish")


@pytest.mark.parametrize("window", [False, True], ids=["byte-table", "tokenizer-window"])
@pytest.mark.parametrize(
    "stop,eos_at,ignore_eos",
    [(None, None, True), (["fox"], None, True), (["🙂"], None, True), (None, 9, False), (["lazy"], 12, True)],
)
def test_merged_deltas_equal_one_token_deltas_and_the_whole_decode(tokenizer, window, stop, eos_at, ignore_eos):
    ids = _ids(tokenizer)
    if eos_at is not None:
        ids = ids[:eos_at] + [EOS] + ids[eos_at:]
    finish = "length"
    if not ignore_eos and eos_at is not None:
        ids, finish = ids[: eos_at + 1], "stop"  # the engine ends the request on its EOS token
    cfg = GenerationConfig(max_new_tokens=len(ids), stop_words=stop, ignore_eos=ignore_eos, logprobs=2)
    deltas = _deltas(ids, finish)
    want = _run(tokenizer, deltas, cfg, [1], window)
    for groups in ([2], [3, 1, 5], [len(ids)], [7, 2]):
        assert _run(tokenizer, deltas, cfg, groups, window) == want, groups
    # the reference: the whole output decoded at once, cut before the first stop string
    text, tokens, lps, reason, n = want
    full = tokenizer.hf.decode([t for t in tokens if ignore_eos or t != EOS], skip_special_tokens=True)
    if stop and any(w in full for w in stop):
        assert reason == "stop" and text == full[: min(full.find(w) for w in stop if w in full)]
    else:
        assert reason == finish and text == full
    assert n == len(tokens) == len(lps) and [t for t, _, _ in lps] == tokens


def test_a_stream_hands_over_everything_pending_at_once():
    async def main():
        s = _Stream(0)
        for i in range(3):
            s.put(i)
        assert await s.take() == [0, 1, 2]
        waiting = asyncio.ensure_future(s.take())
        await asyncio.sleep(0)
        assert not waiting.done()
        s.put(3)
        s.put(4)
        assert await waiting == [3, 4]

    asyncio.run(main())


class BurstEngine:
    """An Engine for EngineCore whose every step sends each request's next tokens as several one-token deltas in
    one message (so the front end always has more than one pending: it must merge them)."""

    def __init__(self, script: list[int]):
        self.detokenize = False
        self.model_name, self.session_len, self.vocab_size, self.eos_token_ids = "tiny", 1024, TINY_VOCAB, [EOS]
        self.engine_config = type("C", (), {"block_size": 16, "enable_prefix_caching": False})()
        self.script, self.running, self.steps = script, {}, 0

    def add_request(self, input_ids, cfg, rid):
        self.running[rid] = [len(input_ids), 0, cfg]

    def abort(self, rid):
        st = self.running.pop(rid, None)
        return None if st is None else RequestOutput(rid, "", [], None, "abort", st[0], st[1])

    def has_unfinished(self):
        return bool(self.running)

    def stats(self):
        return EngineStats(len(self.running), 0, 10, 10, 0.0, 0, 0)

    def step(self):
        self.steps += 1
        outs = []
        for rid in list(self.running):
            st = self.running[rid]
            for _ in range(1 + self.steps % 3):
                t = self.script[st[1] % len(self.script)]
                st[1] += 1
                lp = [TokenLogprob(t, -0.5, [(t, -0.5)])] if st[2].logprobs else None
                stop = t == EOS and not st[2].ignore_eos
                done = stop or st[1] >= st[2].max_new_tokens
                outs.append(RequestOutput(rid, "", [t], lp, ("stop" if stop else "length") if done else None, st[0],
                                          st[1]))  # fmt: skip
                if done:
                    del self.running[rid]
                    break
        return outs

    def close(self):
        pass


@pytest.mark.parametrize("stop", [None, ["lazy"]])
def test_streamed_completion_with_merged_deltas_equals_the_unstreamed_one(tokenizer, tmp_path, stop):
    import zmq

    from lmforge.engine.core import EngineCore, _router_socket, encode
    from lmforge.serve.app import build_app

    script = _ids(tokenizer)
    address = f"ipc://{tmp_path}/core"
    ctx = zmq.Context()
    core = EngineCore(BurstEngine(script), _router_socket(ctx, address))
    thread = threading.Thread(target=core.run, daemon=True)
    thread.start()

    async def main():
        client = await EngineCoreClient.connect([address], [os.getpid()], tokenizer)
        app = build_app(client, "tiny")
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 40, "logprobs": 1, "stop": stop,
                "ignore_eos": True}  # fmt: skip
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
                plain = (await http.post("/v1/completions", json=body)).json()
                stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
                chunks = []
                async with http.stream("POST", "/v1/completions", json=stream) as resp:
                    async for line in resp.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            chunks.append(json.loads(line[6:]))
        finally:
            await client.close()
        return plain, chunks

    try:
        plain, chunks = asyncio.run(main())
    finally:
        sock = ctx.socket(zmq.DEALER)
        sock.connect(address)
        sock.send(encode(["shutdown"]))
        thread.join(10)
        sock.close()
        with contextlib.suppress(Exception):
            core.socket.close()
        ctx.term()
    choice = plain["choices"][0]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    lps = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    tokens = [t for lp in lps for t in lp["tokens"]]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert text == choice["text"] and finish == [choice["finish_reason"]]
    assert chunks[-1]["usage"] == plain["usage"]
    assert tokens == choice["logprobs"]["tokens"]
    full = tokenizer.hf.decode((script * 2)[:40])
    if stop:
        assert choice["finish_reason"] == "stop" and choice["text"] == full[: full.find("lazy")]
        assert plain["usage"]["completion_tokens"] == len(tokens) < 40
    else:
        assert choice["finish_reason"] == "length" and choice["text"] == full
        assert plain["usage"]["completion_tokens"] == 40 == len(tokens)
    # merging happened: fewer text chunks than tokens
    assert len([c for c in chunks if c["choices"]]) < len(tokens)


def test_a_steps_deltas_cross_the_socket_as_columns_unchanged():
    from lmforge.engine.core import decode, encode, pack_outputs, unpack_outputs

    outs = [
        RequestOutput(
            "a", "", [5, 6], [TokenLogprob(5, -0.5, [(5, -0.5), (9, -2.0)]), TokenLogprob(6, -0.25, [])], None, 3, 2
        ),  # fmt: skip
        RequestOutput("b", "", [7], None, "length", 4, 10),
        RequestOutput("c", "", [], None, "error", 0, 0, "core died"),
    ]
    assert unpack_outputs(decode(encode(pack_outputs(outs)))) == outs
    plain = [RequestOutput("d", "", [1], None, None, 2, 1), RequestOutput("e", "text", [2], None, "stop", 2, 1)]
    cols = pack_outputs(plain)
    assert cols[5] is None and cols[6] is None  # no logprobs, no errors: nothing sent for them
    assert unpack_outputs(decode(encode(cols))) == plain
