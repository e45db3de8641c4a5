"""The official `openai` client against a real `lmforge serve` (tiny random Llama whose chat template renders
tools the Hermes way and opens a <think> block, DeepSeek-R1 style): named and required tool calls that validate
against their schema, a full tool round trip, streamed tool-call deltas reassembled by the client's own stream
helper, reasoning_content, chat_template_kwargs, logit_bias forcing a token, and a 400 naming an unsupported field.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from .conftest import TINY_SERVER_ARGS, ServerProcess, build_tiny_model

THINK_TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %}\n{{ t['function'] | tojson }}{% endfor %}\n"
    'Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n{% endif %}'
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ {'name': c['function']['name'], "
    "'arguments': c['function']['arguments']} | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n"
    "{% if enable_thinking is false %}\n</think>\n\n{% endif %}{% endif %}"
)
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[A-Za-z]{1,10}$"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "EST"]}}, "required": ["zone"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def think_model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-think")
    build_tiny_model(path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = THINK_TOOL_TEMPLATE
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def server(think_model_dir):
    proc = ServerProcess([think_model_dir, *TINY_SERVER_ARGS])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_named_and_required_calls_validate_against_their_schema(client):
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, temperature=1.0, seed=0, max_tokens=150)
    resp = client.chat.completions.create(**kw, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)

    resp = client.chat.completions.create(**kw, tool_choice="required", parallel_tool_calls=False)
    (call,) = resp.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_full_tool_round_trip(client):
    first = client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS[1:], tool_choice="required", temperature=0, max_tokens=150
    )
    message = first.choices[0].message
    assert message.tool_calls
    # the reply goes back as the client returned it, then one result per call, as agent loops do
    history = [*ASK, message] + [
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "sunny", "celsius": 21})}
        for call in message.tool_calls
    ]
    second = client.chat.completions.create(
        model="tiny", messages=history, tools=TOOLS[1:], temperature=0, max_tokens=4
    )
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 10  # the call and its result are in the prompt


def test_streamed_tool_call_deltas_reassemble(client):
    # one small tool keeps the replies short on a slow machine; the schema tests above cover the choice of tool
    kw = dict(model="tiny", messages=ASK, tools=TOOLS[1:], temperature=0, max_tokens=150, parallel_tool_calls=False)
    for choice in ({"type": "function", "function": {"name": "get_time"}}, "required"):
        whole = client.chat.completions.create(**kw, tool_choice=choice).choices[0].message
        with client.beta.chat.completions.stream(**kw, tool_choice=choice) as stream:
            for _ in stream:
                pass
            final = stream.get_final_completion()
        streamed = final.choices[0].message
        assert final.choices[0].finish_reason == "tool_calls"
        assert [(c.function.name, c.function.arguments) for c in streamed.tool_calls] == [
            (c.function.name, c.function.arguments) for c in whole.tool_calls
        ]
        for call in streamed.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def reference_text(client, prompt: str, max_tokens: int) -> str:
    """The same prompt through /v1/completions, greedy: what the split reply must add up to. The rendered chat's
    special tokens are meant as such here (parse_special_tokens), as the chat endpoint's template puts them."""
    extra = {"parse_special_tokens": True}
    kw = dict(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=extra)
    resp = client.completions.create(**kw)
    return resp.choices[0].text


def test_reasoning_content_streamed_and_not(client, think_model_dir):
    tok = AutoTokenizer.from_pretrained(think_model_dir)
    prompt = tok.apply_chat_template(ASK, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<think>\n")  # the template opens the thinking: everything generated is reasoning
    expected = reference_text(client, prompt, 12)
    kw = dict(model="tiny", messages=ASK, temperature=0, max_tokens=12)
    msg = client.chat.completions.create(**kw).choices[0].message
    assert msg.reasoning_content == expected and not msg.content
    parts = {"reasoning_content": "", "content": ""}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for key in parts:
            parts[key] += getattr(chunk.choices[0].delta, key, None) or "" if chunk.choices else ""
    assert parts == {"reasoning_content": expected, "content": ""}

    # enable_thinking=false closes the think block in the prompt (chat_template_kwargs reach the template)
    closed = tok.apply_chat_template(ASK, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    msg = (
        client.chat.completions.create(**kw, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        .choices[0]
        .message
    )
    assert msg.reasoning_content is None and msg.content == reference_text(client, closed, 12)


def test_logit_bias_forces_a_token(client, think_model_dir):
    tok = AutoTokenizer.from_pretrained(think_model_dir)
    token = tok.encode(" Paris", add_special_tokens=False)[-1]
    text = tok.decode([token])
    resp = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=5, temperature=1.0, logit_bias={str(token): 100}, logprobs=0
    )
    assert resp.choices[0].logprobs.tokens == [text] * 5
    chat = client.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=3, temperature=1.0, logit_bias={str(token): 100}, logprobs=True
    )
    assert [t.token for t in chat.choices[0].logprobs.content] == [text] * 3  # -100 bans: tests/engine/test_sampler


def test_unsupported_field_is_a_400_that_names_it(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2, reasoning_effort="high")
    assert err.value.body["param"] == "reasoning_effort" and err.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2, logit_bias={"5": 250})
    assert err.value.body["param"] == "logit_bias"
