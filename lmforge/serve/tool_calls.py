"""Tool calling for /v1/chat/completions: the request's tools and tool_choice as a plan, the conversation's tool
messages as the chat template wants them, the grammar that forces `required` and named calls, and the reader that
turns a reply (whole or streamed) into content and tool calls.

- auto: the template renders the tools (or, for a template that knows none, a system message lmforge writes); the
  reply is read with the model's format (lmforge.serve.tool_parsers); a call that does not parse stays text.
- required / a named function: an xgrammar JSON-schema grammar (lmforge.engine.guided) admits only a call list
  (required) or the named function's arguments object, so the arguments always parse and fit the schema.
- none: no tools reach the template and the reply is text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from .errors import invalid
from .protocol import ChatCompletionRequest
from .tool_parsers import PARSERS, ToolParser


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolPlan:
    mode: str  # "none", "auto", "required" or "named"
    tools: list[dict] = field(default_factory=list)  # OpenAI tool objects, as the chat templates take them
    named: str | None = None
    parallel: bool = True
    parser: ToolParser | None = None  # auto: how the model writes calls

    @property
    def is_forced(self) -> bool:
        return self.mode in ("required", "named")

    def guide_spec(self) -> dict | None:
        """The response_format-style json_schema spec that forces this plan's calls, or None (auto / none)."""
        params = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in self.tools}
        if self.mode == "named":
            return {"type": "json_schema", "json_schema": {"name": self.named, "schema": params[self.named]}}
        if self.mode != "required":
            return None
        one_call = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": schema},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for name, schema in params.items()
        ]
        calls = {"type": "array", "items": {"anyOf": one_call}, "minItems": 1}
        if not self.parallel:
            calls["maxItems"] = 1
        return {"type": "json_schema", "json_schema": {"name": "tool_calls", "schema": calls}}


def plan_tools(req: ChatCompletionRequest, parser_name: str) -> ToolPlan:
    """Check tools / tool_choice / parallel_tool_calls together (400s name the field) and make the plan."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise invalid("tools must have distinct function names", "tools")
    choice = req.tool_choice
    parallel = True if req.parallel_tool_calls is None else req.parallel_tool_calls
    if choice is None:
        choice = "auto" if tools else "none"
    if choice != "none" and not tools:
        raise invalid("tool_choice needs a non-empty tools list", "tool_choice")
    if choice == "none":
        return ToolPlan("none", parallel=parallel)
    if not isinstance(choice, str):
        if choice.function.name not in names:
            raise invalid(
                f"tool_choice names function '{choice.function.name}', which is not in tools ({', '.join(names)})",
                "tool_choice",
            )
        return ToolPlan("named", tools, choice.function.name, parallel)
    if choice == "required":
        return ToolPlan("required", tools, None, parallel)
    return ToolPlan("auto", tools, None, parallel, PARSERS[parser_name]())


def template_messages(req: ChatCompletionRequest) -> list[dict]:
    """The request's messages as chat templates take them: 'developer' is 'system', an assistant's tool_calls
    carry their arguments as objects (templates write them with `tojson`), tool results keep their call id."""
    messages = []
    for i, m in enumerate(req.messages):
        msg: dict = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            if m.role != "assistant":
                raise invalid("only assistant messages carry tool_calls", f"messages.{i}.tool_calls")
            calls = []
            for j, call in enumerate(m.tool_calls):
                param = f"messages.{i}.tool_calls.{j}.function.arguments"
                try:
                    args = json.loads(call.function.arguments or "{}")
                except json.JSONDecodeError as e:
                    raise invalid(f"tool call arguments are not valid JSON: {e}", param) from None
                function = {"name": call.function.name, "arguments": args}
                calls.append({"id": call.id, "type": "function", "function": function})
            msg["tool_calls"] = calls
        if m.role == "tool":
            if not m.tool_call_id:
                raise invalid("a tool message needs the tool_call_id it answers", f"messages.{i}.tool_call_id")
            msg["tool_call_id"] = m.tool_call_id
        elif m.tool_call_id is not None:
            raise invalid("only tool messages carry a tool_call_id", f"messages.{i}.tool_call_id")
        if m.name is not None:
            msg["name"] = m.name
        if m.reasoning_content is not None:
            msg["reasoning_content"] = m.reasoning_content
        messages.append(msg)
    return messages


_FORMATS = {
    "hermes": '<tool_call>\n{"name": "<function name>", "arguments": <arguments object>}\n</tool_call>',
    "llama3_json": '{"name": "<function name>", "parameters": <arguments object>}',
    "mistral": '[TOOL_CALLS][{"name": "<function name>", "arguments": <arguments object>}]',
}


def with_tools(messages: list[dict], plan: ToolPlan, chat_template: str) -> tuple[list[dict], dict]:
    """(messages, template kwargs) that offer the plan's tools: through the template's own `tools` variable, or,
    for a template that never reads it, a system message that lists them and the format to call them in."""
    if plan.mode == "none" or not plan.tools:
        return messages, {}
    if "tools" in chat_template:
        return messages, {"tools": plan.tools}
    fmt = _FORMATS[plan.parser.name if plan.parser else "hermes"]
    text = (
        "You can call functions. To call one, reply with exactly\n"
        f"{fmt}\nand nothing else (one block per call). The functions:\n"
        + "\n".join(json.dumps(t["function"]) for t in plan.tools)
    )
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]], {}
    return [{"role": "system", "content": text}, *messages], {}


def _partial_suffix(text: str, tag: str) -> int:
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ToolCallReader:
    """One choice's reply text in, events out: ("content", text), ("call", index, id, name, arguments JSON) and,
    for a named function streamed as it is generated, ("call", 0, id, name, "") then ("arguments", 0, text)."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.state = "content"
        self.buf = ""
        self.num_calls = 0
        self.has_text = False  # non-blank content already emitted (Llama's JSON must open the reply)
        self.has_text_after_call = False

    def _call(self, name: str, args) -> list[tuple]:
        if self.num_calls and not self.plan.parallel:
            return []  # parallel_tool_calls=false: the first call is the reply
        self.num_calls += 1
        arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        return [("call", self.num_calls - 1, new_call_id(), name, arguments)]

    def _content(self, text: str) -> list[tuple]:
        if self.num_calls:  # the blanks between and after calls are layout, not content
            text = text.lstrip() if not self.has_text_after_call else text
            self.has_text_after_call = bool(text)
        if not text:
            return []
        self.has_text = self.has_text or bool(text.strip())
        return [("content", text)]

    def feed(self, text: str) -> list[tuple]:
        mode = self.plan.mode
        if mode == "named":
            events = [] if self.num_calls else self._call(self.plan.named, "")
            return events + ([("arguments", 0, text)] if text else [])
        if mode == "required":
            self.buf += text
            return []
        if mode == "none":
            return self._content(text)
        self.buf += text
        return self._scan(final=False)

    def _scan(self, final: bool) -> list[tuple]:
        parser = self.plan.parser
        events: list[tuple] = []
        while True:
            if self.state == "content":
                if parser.at_reply_start_only:
                    head = self.buf.lstrip()
                    body = head.removeprefix("<|python_tag|>")
                    if not self.has_text and body.startswith(parser.start):
                        self.state = "region"
                        continue
                    could_open = parser.start.startswith(body) or "<|python_tag|>".startswith(head)
                    if not final and not self.has_text and could_open:
                        return events  # blanks, or the start of the tag: the call may still come
                    events += self._content(self.buf)
                    self.buf = ""
                    return events
                idx = self.buf.find(parser.start)
                if idx < 0:
                    keep = 0 if final else _partial_suffix(self.buf, parser.start)
                    events += self._content(self.buf[: len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep :]
                    return events
                events += self._content(self.buf[:idx])
                self.buf, self.state = self.buf[idx:], "region"
            end = getattr(parser, "block_end", None)
            if end is not None and not final:
                stop = self.buf.find(end)
                if stop < 0:
                    return events
                block, rest = self.buf[: stop + len(end)], self.buf[stop + len(end) :]
                events += self._region(block)
                self.buf, self.state = rest, "content"
                continue
            if not final:
                return events
            events += self._region(self.buf)
            self.buf = ""
            return events

    def _region(self, region: str) -> list[tuple]:
        calls = self.plan.parser.parse(region.strip())
        if calls is None:  # malformed: the model's text, as it wrote it
            return self._content(region)
        return [e for name, args in calls for e in self._call(name, args)]

    def finish(self, finish_reason: str | None) -> list[tuple]:
        mode = self.plan.mode
        if mode == "required":
            text, self.buf = self.buf, ""
            try:
                calls = [(c["name"], c["arguments"]) for c in json.loads(text)]
            except (ValueError, TypeError, KeyError):  # cut off by max_tokens (or the grammar ended): as text
                return self._content(text)
            return [e for name, args in calls for e in self._call(name, args)]
        if mode == "auto":
            return self._scan(final=True)
        return []
