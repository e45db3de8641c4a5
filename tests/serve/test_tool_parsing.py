"""Reading replies: the three tool-call formats, malformed calls staying text, <think> splitting, and the same
result whether a reply arrives whole or one character at a time (the streamed path)."""

from __future__ import annotations

import json

import pytest

from lmforge.serve.chat_output import ChatOutput
from lmforge.serve.reasoning import ReasoningSplitter, detect_reasoning_parser
from lmforge.serve.tool_calls import ToolPlan
from lmforge.serve.tool_parsers import PARSERS, detect_tool_parser

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def auto(parser: str, parallel: bool = True) -> ToolPlan:
    return ToolPlan("auto", TOOLS, None, parallel, PARSERS[parser]())


def read(plan: ToolPlan, text: str, prompt: str = "", reasoning: bool = False, chunk: int | None = None):
    """(message, finish_reason, deltas) of `text` fed whole (chunk None) or in pieces of `chunk` characters."""
    out = ChatOutput(plan, prompt, reasoning)
    pieces = [text] if chunk is None else [text[i : i + chunk] for i in range(0, len(text), chunk)]
    deltas = [d for p in pieces for d in out.feed(p)]
    more, reason = out.finish("stop")
    return out.message(), reason, deltas + more


def reassemble(deltas: list[dict]) -> dict:
    """What a client rebuilds from stream deltas (the openai SDK's accumulation)."""
    msg = {"content": "", "reasoning_content": "", "tool_calls": {}}
    for d in deltas:
        msg["content"] += d.get("content") or ""
        msg["reasoning_content"] += d.get("reasoning_content") or ""
        for tc in d.get("tool_calls") or []:
            call = msg["tool_calls"].setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
            call["id"] = tc.get("id") or call["id"]
            call["name"] += tc.get("function", {}).get("name") or ""
            call["arguments"] += tc.get("function", {}).get("arguments") or ""
    return msg


CASES = [
    (
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>',
        "Let me check.\n",
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})],
    ),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "get_weather", "parameters": {"city": "Rome"}}',
        "",
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})],
    ),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "arguments": {}}', "", [("get_weather", {})]),
    (
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "x", "arguments": {}}]',
        "",
        [("get_weather", {"city": "Paris"}), ("x", {})],
    ),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "", [("get_weather", {"city": "Paris"})]),
]


@pytest.mark.parametrize("chunk", [None, 1, 7])
@pytest.mark.parametrize("parser, text, content, calls", CASES)
def test_tool_call_formats(parser, text, content, calls, chunk):
    msg, reason, deltas = read(auto(parser), text, chunk=chunk)
    assert reason == "tool_calls"
    assert (msg.content or "") == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == calls
    streamed = reassemble(deltas)
    assert streamed["content"] == content
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed["tool_calls"].values()] == calls
    assert [c["id"] for c in streamed["tool_calls"].values()] == [c.id for c in msg.tool_calls]
    # each call opens with its id, type and name, the OpenAI stream shape
    heads = [tc for d in deltas for tc in d.get("tool_calls", []) if "id" in tc]
    assert all(h["type"] == "function" and h["function"]["name"] for h in heads) and len(heads) == len(calls)


@pytest.mark.parametrize("chunk", [None, 1])
@pytest.mark.parametrize(
    "parser, text",
    [
        ("hermes", 'Sure <tool_call>{"name": "get_weather", "arguments": {"city": </tool_call> done'),
        ("hermes", "I would use <tool_call> but it is cut off"),
        ("llama3_json", '{"name": "get_weather", "parameters": {"city"'),
        ("llama3_json", "The weather is {fine}."),
        ("mistral", "[TOOL_CALLS] not json"),
        ("hermes", "Plain answer, no calls; a < sign and <tool_ alone."),
    ],
)
def test_malformed_calls_stay_text(parser, text, chunk):
    msg, reason, deltas = read(auto(parser), text, chunk=chunk)
    assert reason == "stop" and msg.tool_calls is None and msg.content == text
    assert reassemble(deltas)["content"] == text


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "A"}}</tool_call>'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "B"}}</tool_call>'
    )
    msg, _, _ = read(auto("hermes", parallel=False), text)
    assert [json.loads(c.function.arguments) for c in msg.tool_calls] == [{"city": "A"}]


def test_named_call_streams_its_arguments_as_generated():
    plan = ToolPlan("named", TOOLS, "get_weather")
    msg, reason, deltas = read(plan, '{"city": "Paris"}', chunk=3)
    assert reason == "tool_calls" and msg.content is None
    assert msg.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris"}
    assert len(deltas) == 1 + 6  # the head, then one arguments delta per piece
    assert reassemble(deltas)["tool_calls"][0]["arguments"] == '{"city": "Paris"}'


def test_required_call_list():
    plan = ToolPlan("required", TOOLS)
    msg, reason, _ = read(plan, '[{"name": "get_weather", "arguments": {"city": "Oslo"}}]', chunk=4)
    assert reason == "tool_calls" and json.loads(msg.tool_calls[0].function.arguments) == {"city": "Oslo"}


@pytest.mark.parametrize("chunk", [None, 1, 5])
@pytest.mark.parametrize(
    "prompt, text, reasoning, content",
    [
        ("<|im_start|>assistant\n", "<think>\nLet me think.\n</think>\n\nParis.", "\nLet me think.\n", "Paris."),
        ("<|User|>hi<|Assistant|><think>\n", "Hmm, easy.</think>Paris.", "Hmm, easy.", "Paris."),  # R1 opens it
        ("assistant\n<think>\n\n</think>\n\n", "Paris.", None, "Paris."),  # enable_thinking=false closed it
        ("assistant\n", "Paris, no thinking.", None, "Paris, no thinking."),
        ("assistant\n", "<think>cut off by max_tok", "cut off by max_tok", None),
        ("assistant\n", "<thin", None, "<thin"),  # a partial tag that never completes is text
    ],
)
def test_reasoning_split(prompt, text, reasoning, content, chunk):
    plan = ToolPlan("none")
    msg, _, deltas = read(plan, text, prompt=prompt, reasoning=True, chunk=chunk)
    assert msg.reasoning_content == reasoning and (msg.content or None) == content
    streamed = reassemble(deltas)
    assert (streamed["reasoning_content"] or None) == reasoning and (streamed["content"] or None) == content


def test_reasoning_then_a_tool_call():
    text = '<think>I need the weather.</think>\n<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    msg, reason, _ = read(auto("hermes"), text, prompt="assistant\n", reasoning=True, chunk=2)
    assert msg.reasoning_content == "I need the weather." and reason == "tool_calls" and not msg.content


def test_splitter_holds_back_only_a_possible_tag():
    s = ReasoningSplitter("x<think>")
    assert s.feed("abc</th") == [("reasoning", "abc")]
    assert s.feed("ink>ok") == [("content", "ok")]


def test_detection_from_the_chat_template():
    assert detect_tool_parser("{{ '<tool_call>' }}") == "hermes"
    assert detect_tool_parser("[TOOL_CALLS] {{ tools }}") == "mistral"
    assert detect_tool_parser("<|python_tag|>{{ tools }}") == "llama3_json"
    assert detect_tool_parser(None) == "hermes"
    assert detect_reasoning_parser("{{ '<think>' }}...{{ '</think>' }}") == "qwen3"
    assert detect_reasoning_parser("<|im_start|>") is None


def test_a_forced_call_cut_off_by_max_tokens():
    out = ChatOutput(ToolPlan("required", TOOLS), "", False)
    out.feed('[{"name": "get_weather", "argu')
    _, reason = out.finish("length")
    msg = out.message()
    assert reason == "length" and msg.tool_calls is None and msg.content == '[{"name": "get_weather", "argu'
    named = ChatOutput(ToolPlan("named", TOOLS, "get_weather"), "", False)
    named.feed('{"city": "Pa')
    _, reason = named.finish("length")  # streamed as it came: the partial arguments stay, as OpenAI's do
    assert reason == "length" and named.message().tool_calls[0].function.arguments == '{"city": "Pa'
