"""Reasoning output: the `<think>...</think>` part of a reply goes to `reasoning_content`, the rest to `content`.

Qwen3 and DeepSeek-R1 style models think inside these tags. Some templates open the tag in the prompt itself
(DeepSeek-R1 ends its generation prompt with `<think>\\n`; Qwen3 with enable_thinking=false closes it there), so
whether a reply starts inside the thinking is read from the rendered prompt, not assumed.
"""

from __future__ import annotations

START, END = "<think>", "</think>"
REASONING_PARSERS = ("qwen3", "deepseek_r1")  # both split on <think>...</think>; the prompt tells where to start


def detect_reasoning_parser(chat_template: str | None) -> str | None:
    """A template that writes the think tags teaches a reasoning model."""
    return "qwen3" if chat_template and END in chat_template else None


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (held back: the tag may follow)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningSplitter:
    """Feeds of reply text in, (kind, text) pieces out, kind 'reasoning' or 'content'; tags never reach either."""

    def __init__(self, prompt: str):
        opened, closed = prompt.rfind(START), prompt.rfind(END)
        self.state = "reasoning" if opened > closed else "before"
        self.buf = ""
        self.content_started = False

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buf += text
        out: list[tuple[str, str]] = []
        if self.state == "before":
            head = self.buf.lstrip()
            if head.startswith(START):
                self.state, self.buf = "reasoning", head[len(START) :]
            elif not START.startswith(head):  # cannot become the tag: this reply does not think
                self.state, self.content_started = "content", True
            else:
                return out
        if self.state == "reasoning":
            end = self.buf.find(END)
            if end < 0:
                keep = _partial_suffix(self.buf, END)
                piece, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
                if piece:
                    out.append(("reasoning", piece))
                return out
            if end:
                out.append(("reasoning", self.buf[:end]))
            self.state, self.buf = "content", self.buf[end + len(END) :]
        if self.state == "content" and self.buf:
            piece = self.buf if self.content_started else self.buf.lstrip()  # the blank line after </think>
            self.buf = ""
            if piece:
                self.content_started = True
                out.append(("content", piece))
        return out

    def flush(self) -> list[tuple[str, str]]:
        """End of the reply: a held-back partial tag is text after all."""
        piece, self.buf = self.buf, ""
        if not piece:
            return []
        return [("reasoning" if self.state == "reasoning" else "content", piece)]
