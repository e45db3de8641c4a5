"""Tool-call formats that open models write in their replies, and how to read them back into (name, arguments).

- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call (Hermes, Qwen2.5, Qwen3).
- llama3_json: the whole reply is `{"name": ..., "parameters": {...}}` (optionally after `<|python_tag|>`), several
  separated by `;` (Llama 3.1-3.3 with JSON tool calling).
- mistral: `[TOOL_CALLS]` then a JSON list of `{"name", "arguments"}` (v3 tokenizers), or `name[ARGS]{...}` per
  call (v11+).

A parser only reads text: lmforge.serve.tool_calls decides when a region of the reply is handed to it. A region
that does not parse is given back as plain text, never an error.
"""

from __future__ import annotations

import json
import re

Call = tuple[str, dict]  # (function name, arguments object)


def _json_values(text: str, sep: str = "") -> list | None:
    """Every JSON value in `text`, one after another, separated by blanks (and `sep`); None if anything else."""
    decoder = json.JSONDecoder()
    values, pos = [], 0
    while True:
        while pos < len(text) and (text[pos].isspace() or (sep and text[pos] == sep)):
            pos += 1
        if pos == len(text):
            return values
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        values.append(value)


def _as_call(obj, args_keys: tuple[str, ...]) -> Call | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for key in args_keys:
        if key in obj:
            args = obj[key]
            if isinstance(args, str):  # some models encode the arguments object as a string
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    return None
            return (obj["name"], args) if isinstance(args, dict) else None
    return obj["name"], {}


class ToolParser:
    name: str
    start: str  # the text that opens the tool-call region
    at_reply_start_only = False  # the region may only open the reply (Llama's bare JSON)
    block_end: str | None = None  # closes one call, so calls can be read while the reply streams
    needs_special_tokens = False  # the start marker is a special token, so it must not be skipped when decoding

    def parse(self, region: str) -> list[Call] | None:
        """The calls in `region` (which starts with `start`), or None when it is not a well-formed call list."""
        raise NotImplementedError


class HermesParser(ToolParser):
    name = "hermes"
    start = "<tool_call>"
    block_end = "</tool_call>"
    _block = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)

    def parse(self, region: str) -> list[Call] | None:
        calls = []
        pos = 0
        for m in self._block.finditer(region):
            if region[pos : m.start()].strip():
                return None
            values = _json_values(m.group(1))
            call = _as_call(values[0], ("arguments", "parameters")) if values and len(values) == 1 else None
            if call is None:
                return None
            calls.append(call)
            pos = m.end()
        if region[pos:].strip() or not calls:
            return None
        return calls


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    start = "{"
    at_reply_start_only = True

    def parse(self, region: str) -> list[Call] | None:
        values = _json_values(region.removeprefix("<|python_tag|>"), sep=";")
        if not values:
            return None
        calls = [_as_call(v, ("parameters", "arguments")) for v in values]
        return None if any(c is None for c in calls) else calls


class MistralParser(ToolParser):
    name = "mistral"
    start = "[TOOL_CALLS]"
    needs_special_tokens = True
    _named = re.compile(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[ARGS\])?\s*")

    def parse(self, region: str) -> list[Call] | None:
        body = region[len(self.start) :]
        values = _json_values(body)
        if values and len(values) == 1 and isinstance(values[0], list):
            calls = [_as_call(v, ("arguments", "parameters")) for v in values[0]]
            return None if not calls or any(c is None for c in calls) else calls
        # v11+: name[ARGS]{...}, repeated with [TOOL_CALLS] between calls
        calls = []
        for part in body.split(self.start):
            m = self._named.match(part)
            args = _json_values(part[m.end() :]) if m else None
            if not args or len(args) != 1 or not isinstance(args[0], dict):
                return None
            calls.append((m.group(1), args[0]))
        return calls


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}


def detect_tool_parser(chat_template: str | None) -> str:
    """The format a chat template teaches its model; hermes when the template says nothing (it is the one lmforge
    describes to the model itself then, see tool_calls.tool_system_prompt)."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or '"parameters"' in template or "ipython" in template:
        return "llama3_json"
    return "hermes"
