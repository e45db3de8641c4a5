"""Chat templates rendered the way HF transformers renders them, without importing transformers.

The templates on the Hub are written against transformers' Jinja environment: a sandbox with `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that does not escape HTML and keeps non-ASCII text,
`raise_exception(message)`, `strftime_now(format)`, and `{% generation %}` blocks (which only mark the assistant's
text for training masks, and render their body). Messages reach the template as plain data: keys whose value is
None are dropped (many templates print "None" or fail on them), and a message's reasoning given under `thinking` or
`reasoning` is also offered as `reasoning_content`, the name templates read. The special tokens (`bos_token`,
`eos_token`, ...) are template variables; the caller's keyword arguments override them.
`tests/test_fast_tokenizer.py` checks the rendering against `transformers`' apply_chat_template.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

_REASONING = ("reasoning_content", "thinking", "reasoning")


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def plain(value: Any) -> Any:
    """JSON-like data only (dicts, lists, strings, numbers, booleans, None): what a template may look into.
    Dataclasses and pydantic models become dicts; anything else becomes a placeholder naming its type."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):  # subclasses (enums, ...) are stripped back to the base type's value
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if type(value).__module__ == "numpy" and getattr(value, "ndim", 1) == 0:  # np.bool_, np.int64, ...
        return plain(value.item())
    if isinstance(value, Mapping):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _message(message: Any) -> dict:
    message = plain(message)
    if not isinstance(message, dict):
        raise TypeError(f"a chat message must be a dict (role, content, ...), not {message!r}")
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def render_chat(
    template: str,
    messages: list,
    special_tokens: Mapping[str, str],
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    **kwargs,
) -> str:
    """The text of `messages` through `template`; `special_tokens` are the named special tokens (bos_token, ...)."""
    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation: send at least one message")
    if tools is not None and not all(isinstance(t, Mapping) for t in tools):
        raise ValueError("tools must be JSON schemas (dicts)")
    variables = {**special_tokens, **plain(kwargs)}
    return compile_template(template).render(
        messages=[_message(m) for m in messages],
        tools=plain(tools),
        documents=plain(documents),
        add_generation_prompt=add_generation_prompt,
        **variables,
    )
