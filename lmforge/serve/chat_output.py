"""One chat choice's reply, read as it arrives: reasoning (lmforge.serve.reasoning) first, then tool calls
(lmforge.serve.tool_calls) in what is left. Gives the OpenAI stream deltas and the final message, so the streamed
and the non-streamed replies are the same reading of the same text.
"""

from __future__ import annotations

from .protocol import AssistantMessage, FunctionCall, ToolCall
from .reasoning import ReasoningSplitter
from .tool_calls import ToolCallReader, ToolPlan


class ChatOutput:
    def __init__(self, plan: ToolPlan, prompt: str, split_reasoning: bool):
        self.splitter = ReasoningSplitter(prompt) if split_reasoning else None
        self.reader = ToolCallReader(plan)
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[dict] = []  # {"id", "name", "arguments"} by index

    def feed(self, text: str) -> list[dict]:
        """Delta dicts (the `delta` of a chat.completion.chunk) for one piece of reply text."""
        return self._pieces(self.splitter.feed(text) if self.splitter else [("content", text)])

    def finish(self, finish_reason: str) -> tuple[list[dict], str]:
        """The deltas still held back, and the choice's finish_reason ('tool_calls' when it ended in calls)."""
        deltas = self._pieces(self.splitter.flush()) if self.splitter else []
        deltas += self._events(self.reader.finish(finish_reason))
        return deltas, "tool_calls" if self.calls and finish_reason == "stop" else finish_reason

    def message(self) -> AssistantMessage:
        content = "".join(self.content)
        calls = [
            ToolCall(id=c["id"], function=FunctionCall(name=c["name"], arguments=c["arguments"])) for c in self.calls
        ]
        return AssistantMessage(
            content=content if content or not calls else None,
            reasoning_content="".join(self.reasoning) if self.reasoning else None,
            tool_calls=calls or None,
        )

    def _pieces(self, pieces: list[tuple[str, str]]) -> list[dict]:
        deltas = []
        for kind, text in pieces:
            if kind == "reasoning":
                self.reasoning.append(text)
                deltas.append({"reasoning_content": text})
            else:
                deltas += self._events(self.reader.feed(text))
        return deltas

    def _events(self, events: list[tuple]) -> list[dict]:
        deltas = []
        for event in events:
            if event[0] == "content":
                self.content.append(event[1])
                deltas.append({"content": event[1]})
            elif event[0] == "call":
                _, index, call_id, name, arguments = event
                self.calls.append({"id": call_id, "name": name, "arguments": arguments})
                head = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
                deltas.append({"tool_calls": [head]})
                if arguments:
                    deltas.append({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})
            else:  # ("arguments", index, text): a named call's arguments as they are generated
                _, index, text = event
                self.calls[index]["arguments"] += text
                deltas.append({"tool_calls": [{"index": index, "function": {"arguments": text}}]})
        return deltas
