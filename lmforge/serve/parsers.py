"""Which tool-call format and reasoning split a server uses: the `--tool-call-parser` / `--reasoning-parser`
choices, with "auto" read from the model's chat template."""

from __future__ import annotations

from .reasoning import REASONING_PARSERS, detect_reasoning_parser
from .tool_parsers import PARSERS, detect_tool_parser

TOOL_CALL_PARSER_CHOICES = ("auto", *PARSERS)
REASONING_PARSER_CHOICES = ("auto", "none", *REASONING_PARSERS)


def resolve_parsers(tokenizer, tool_call_parser: str = "auto", reasoning_parser: str = "auto") -> tuple:
    """(tool parser name, reasoning parser name or None); ValueError names a choice that does not exist."""
    if tool_call_parser not in TOOL_CALL_PARSER_CHOICES:
        raise ValueError(
            f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSER_CHOICES)}, got {tool_call_parser!r}"
        )
    if reasoning_parser not in REASONING_PARSER_CHOICES:
        raise ValueError(
            f"reasoning_parser must be one of {', '.join(REASONING_PARSER_CHOICES)}, got {reasoning_parser!r}"
        )
    template = getattr(getattr(tokenizer, "hf", None), "chat_template", None)
    template = template if isinstance(template, str) else None
    tools = detect_tool_parser(template) if tool_call_parser == "auto" else tool_call_parser
    if reasoning_parser == "auto":
        reasoning = detect_reasoning_parser(template)
    else:
        reasoning = None if reasoning_parser == "none" else reasoning_parser
    return tools, reasoning
