"""Tool calling, reasoning, logit_bias and the model's defaults through the app (httpx ASGI over the fake engine,
whose random tokens walk the grammar like a real model's would): forced calls always validate, tools and tool
messages reach the chat template, bad combinations are 400s that name the field."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from lmforge.serve.app import build_app
from lmforge.tokenizer import Tokenizer

from .conftest import TINY_VOCAB, asgi_client
from .fake_engine import FakeEngine

pytestmark = pytest.mark.anyio

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
USER = [{"role": "user", "content": "Weather in Paris?"}]
# A ChatML template that renders tools and tool calls the Hermes way, like Qwen2.5's does.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %}\n{{ t['function'] | tojson }}{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ {'name': c['function']['name'], "
    "'arguments': c['function']['arguments']} | tojson }}</tool_call>{% endfor %}"
    "{% if m.get('tool_call_id') %}[for {{ m['tool_call_id'] }}]{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)


class RecordingEngine(FakeEngine):
    """The fake engine, keeping each request's prompt ids and GenerationConfig."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requests: list = []

    def generate(self, input_ids, gen_config, request_id=None, guide=None):
        self.requests.append((list(input_ids), gen_config))
        return super().generate(input_ids, gen_config, request_id, guide)

    def last_prompt(self) -> str:
        return self.tokenizer.decode(self.requests[-1][0], skip_special_tokens=False)


@pytest.fixture
def tool_engine(tokenizer) -> RecordingEngine:
    hf = copy.deepcopy(tokenizer.hf)
    hf.chat_template = TOOL_TEMPLATE
    return RecordingEngine(Tokenizer(hf, tokenizer.eos_token_ids), vocab_size=TINY_VOCAB, session_len=2048)


def body(**kw) -> dict:
    return {"model": "fake-model", "messages": USER, "max_tokens": 120, "tools": TOOLS, **kw}


async def stream_deltas(c, payload: dict) -> tuple[list[dict], list[str]]:
    resp = await c.post("/v1/chat/completions", json={**payload, "stream": True})
    assert resp.status_code == 200, resp.text
    chunks = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")]
    deltas = [ch["choices"][0]["delta"] for ch in chunks if ch["choices"]]
    return deltas, [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]]


def reassemble(deltas: list[dict]) -> list[dict]:
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.get("tool_calls") or []:
            call = calls.setdefault(tc["index"], {"name": "", "arguments": ""})
            call["name"] += tc["function"].get("name") or ""
            call["arguments"] += tc["function"].get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("seed", range(6))
async def test_named_and_required_calls_always_fit_their_schema(tool_engine, seed):
    async with asgi_client(build_app(tool_engine)) as c:
        named = {"type": "function", "function": {"name": "get_weather"}}
        resp = await c.post("/v1/chat/completions", json=body(tool_choice=named, seed=seed, temperature=1.0))
        choice = resp.json()["choices"][0]
        assert resp.status_code == 200 and choice["finish_reason"] == "tool_calls", resp.text
        (call,) = choice["message"]["tool_calls"]
        assert call["type"] == "function" and call["function"]["name"] == "get_weather" and call["id"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)
        assert choice["message"]["content"] is None

        for parallel in (True, False):
            payload = body(tool_choice="required", seed=seed, temperature=1.0, parallel_tool_calls=parallel)
            payload["max_tokens"] = 800  # a random walk may list a few calls
            msg = (await c.post("/v1/chat/completions", json=payload)).json()["choices"][0]["message"]
            assert msg["tool_calls"] and (parallel or len(msg["tool_calls"]) == 1)
            for call in msg["tool_calls"]:
                jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


async def test_streamed_tool_call_deltas_reassemble_to_the_reply(tool_engine):
    async with asgi_client(build_app(tool_engine)) as c:
        for choice in ({"type": "function", "function": {"name": "get_time"}}, "required"):
            payload = body(tool_choice=choice, seed=3, temperature=1.0)
            whole = (await c.post("/v1/chat/completions", json=payload)).json()["choices"][0]["message"]
            deltas, finishes = await stream_deltas(c, payload)
            assert finishes[-1] == "tool_calls"
            calls = reassemble(deltas)
            assert [(x["function"]["name"], x["function"]["arguments"]) for x in whole["tool_calls"]] == [
                (x["name"], x["arguments"]) for x in calls
            ]
            heads = [tc for d in deltas for tc in d.get("tool_calls") or [] if tc.get("id")]
            assert len(heads) == len(calls) and all(h["type"] == "function" for h in heads)


async def test_tools_and_tool_messages_reach_the_template(tool_engine):
    history = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "P"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    async with asgi_client(build_app(tool_engine)) as c:
        resp = await c.post("/v1/chat/completions", json=body(messages=history, max_tokens=4))
        assert resp.status_code == 200, resp.text
        prompt = tool_engine.last_prompt()
        assert '"name": "get_weather"' in prompt and '"description": "Weather"' in prompt  # the tools
        assert '<tool_call>{"name": "get_weather", "arguments": {"city": "P"}}</tool_call>' in prompt
        assert "<|im_start|>tool\nsunny, 21 C[for call_1]<|im_end|>" in prompt
        # tool_choice none: the tools stay out of the prompt and the reply is text
        resp = await c.post("/v1/chat/completions", json=body(tool_choice="none", max_tokens=4))
        assert "Tools:" not in tool_engine.last_prompt() and resp.json()["choices"][0]["message"]["tool_calls"] is None


async def test_a_template_without_tools_gets_them_in_a_system_message(tokenizer):
    engine = RecordingEngine(tokenizer, vocab_size=TINY_VOCAB, session_len=2048)
    async with asgi_client(build_app(engine)) as c:
        resp = await c.post("/v1/chat/completions", json=body(max_tokens=8))
        assert resp.status_code == 200, resp.text
        prompt = engine.last_prompt()
        assert prompt.startswith("<|im_start|>system\nYou can call functions.") and "<tool_call>" in prompt
        assert '"name": "get_time"' in prompt


async def test_auto_reply_that_is_not_a_call_is_text(tool_engine):
    async with asgi_client(build_app(tool_engine)) as c:
        resp = await c.post("/v1/chat/completions", json=body(seed=1, temperature=1.0, max_tokens=30))
        choice = resp.json()["choices"][0]
        assert resp.status_code == 200 and choice["message"]["tool_calls"] is None
        assert choice["finish_reason"] in ("stop", "length") and isinstance(choice["message"]["content"], str)


async def test_chat_template_kwargs_reach_the_template(tool_engine):
    async with asgi_client(build_app(tool_engine)) as c:
        kw = {"chat_template_kwargs": {"enable_thinking": False}, "max_tokens": 2}
        await c.post("/v1/chat/completions", json={**body(**kw), "tools": None})
        assert tool_engine.last_prompt().endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        await c.post("/v1/chat/completions", json={**body(max_tokens=2), "tools": None})
        assert tool_engine.last_prompt().endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "patch, param, code",
    [
        ({"tool_choice": "required", "tools": None}, "tool_choice", None),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", None),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", None),
        ({"reasoning_effort": "high"}, "reasoning_effort", "unsupported_parameter"),
        ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        ({"messages": [{"role": "user", "content": "hi", "audio": {}}]}, "messages.0.audio", "unsupported_parameter"),
        ({"messages": [*USER, {"role": "tool", "content": "x"}]}, "messages.1.tool_call_id", None),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{"}}],
                    }
                ]
            },
            "messages.0.tool_calls.0.function.arguments",
            None,
        ),
        ({"logit_bias": {"5": 101}}, "logit_bias", None),
        ({"logit_bias": {"x": 1}}, "logit_bias", None),
        ({"logit_bias": {str(TINY_VOCAB): 1}}, "logit_bias", None),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice", None),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name", None),
    ],
)
async def test_bad_tool_requests_are_400s_naming_the_field(tool_engine, patch, param, code):
    async with asgi_client(build_app(tool_engine)) as c:
        resp = await c.post("/v1/chat/completions", json=body(**patch))
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert err["param"] == param, err
        assert code is None or err["code"] == code
        if code == "unsupported_parameter":
            assert param in err["message"]


async def test_completions_reject_unknown_fields_too(fake_engine):
    async with asgi_client(build_app(fake_engine)) as c:
        resp = await c.post("/v1/completions", json={"model": "fake-model", "prompt": "hi", "best_of": 2})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "best_of"


async def test_the_models_generation_defaults_fill_unset_fields(tokenizer):
    engine = RecordingEngine(tokenizer, vocab_size=TINY_VOCAB)
    engine.generation_defaults = {"temperature": 0.3, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}
    async with asgi_client(build_app(engine)) as c:
        card = (await c.get("/v1/models")).json()["data"][0]
        assert card["generation_defaults"] == engine.generation_defaults
        await c.post("/v1/chat/completions", json={"model": "fake-model", "messages": USER, "max_tokens": 2})
        cfg = engine.requests[-1][1]
        assert (cfg.temperature, cfg.top_p, cfg.top_k, cfg.repetition_penalty, cfg.do_sample) == (
            0.3,
            0.8,
            20,
            1.1,
            True,
        )
        payload = {"model": "fake-model", "prompt": "hi", "max_tokens": 2, "temperature": 0, "top_k": 5}
        await c.post("/v1/completions", json=payload)
        cfg = engine.requests[-1][1]
        assert not cfg.do_sample and cfg.top_k == 5 and cfg.top_p == 0.8  # what the request sets wins
