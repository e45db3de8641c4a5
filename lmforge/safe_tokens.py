"""Control tokens only where the chat template puts them: text a client sends (message content, a completions
prompt) is tokenized as plain text even when it spells `<|im_end|>`, so a user cannot close their turn and write
the assistant's or the system's.

`ChatEncoder.encode_chat` renders the template once with the real messages. When no message text spells a
control token (the usual case) the prompt is tokenized exactly as before. Otherwise the template is rendered again
with each text wrapped in random markers, which shows where every text sits in the prompt; the prompt is then
split at the template's own control tokens only, and each stretch between them is tokenized with control-token
matching off -- what the tokenizer does itself (it also splits at added tokens and encodes each stretch alone),
except that it cannot tell a template's `<|im_end|>` from a user's.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from collections.abc import Callable
from typing import Any


def _control_tokens(hf: Any) -> dict[str, Any]:
    """content -> AddedToken for the tokens that must not come from client text: every special added token,
    and added tokens the chat template spells (DeepSeek's '<｜User｜>' is a non-special added token)."""
    template = getattr(hf, "chat_template", None) or ""
    if not isinstance(template, str):  # a dict of named templates
        template = " ".join(str(t) for t in dict(template).values())
    out = {}
    for token in (getattr(hf, "added_tokens_decoder", None) or {}).values():
        if token.content and (token.special or token.content in template):
            out[token.content] = token
    return out


def _no_first_prefix(spec: Any) -> Any:
    """Tokenizer JSON with Metaspace's prepend_scheme 'first' turned into 'never' (for text after a control token,
    where a joint encode adds no '▁' either)."""
    if isinstance(spec, dict):
        out = {k: _no_first_prefix(v) for k, v in spec.items()}
        if out.get("type") == "Metaspace" and out.get("prepend_scheme") == "first":
            out["prepend_scheme"] = "never"
        return out
    if isinstance(spec, list):
        return [_no_first_prefix(v) for v in spec]
    return spec


class ChatEncoder:
    """Plain-text encoding next to an HF fast tokenizer `hf` (which is not changed)."""

    def __init__(self, hf: Any):
        if getattr(hf, "backend_tokenizer", None) is None:
            raise ValueError("special-token-safe encoding needs a fast (tokenizers) tokenizer")
        self.hf = hf
        self.controls = _control_tokens(hf)
        contents = sorted(self.controls, key=len, reverse=True)  # longest first, as the tokenizer matches
        self._control_re = re.compile("|".join(re.escape(c) for c in contents)) if contents else None
        self._ids = {c: hf.convert_tokens_to_ids(c) for c in contents}
        self._plain: tuple[Any, Any] | None = None
        self._lock = threading.Lock()

    def _plain_tokenizers(self) -> tuple[Any, Any]:
        """(for text at the start, for text after a control token): copies of the backend tokenizer that read
        control-token spellings as text. Built on the first prompt that needs them (benign chats never do)."""
        with self._lock:
            if self._plain is None:
                from tokenizers import AddedToken
                from tokenizers import Tokenizer as RawTokenizer

                spec = self.hf.backend_tokenizer.to_str()
                inner_spec = json.dumps(_no_first_prefix(json.loads(spec)))
                first = RawTokenizer.from_str(spec)
                inner = first if json.loads(inner_spec) == json.loads(spec) else RawTokenizer.from_str(inner_spec)
                for raw in {id(first): first, id(inner): inner}.values():
                    # non-special control tokens become special here, so encode_special_tokens treats them as text
                    controls = [
                        AddedToken(t.content, special=True, normalized=t.normalized) for t in self.controls.values()
                    ]
                    raw.add_special_tokens(controls)
                    raw.encode_special_tokens = True
                self._plain = (first, inner)
            return self._plain

    def has_control_text(self, text: str) -> bool:
        return self._control_re is not None and self._control_re.search(text) is not None

    def encode_plain(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`text` tokenized with control-token spellings as ordinary text (BOS/EOS still added when asked)."""
        return self._plain_tokenizers()[0].encode(text, add_special_tokens=add_special_tokens).ids

    def encode_chat(self, messages: list[dict], render: Callable[[list[dict]], str]) -> list[int]:
        """Token ids of `render(messages)` (the chat template) where only the template makes control tokens.

        Raises ValueError when a message text spells a control token and the template changes message text in
        a way the markers cannot follow (then it cannot be tokenized safely).
        """
        prompt = render(messages)
        texts = [(i, k, v) for i, m in enumerate(messages) for k, v in m.items() if k != "role" and isinstance(v, str)]
        if not any(self.has_control_text(v) for _, _, v in texts) and not self._nested_control_text(messages):
            return self.hf.encode(prompt, add_special_tokens=False)  # the template already holds BOS and friends
        if self._nested_control_text(messages):
            raise ValueError("message fields other than text content must not spell special tokens")
        pieces = self._locate(messages, texts, prompt, render)
        return self._encode_pieces(pieces)

    def contains_control_text(self, value: Any) -> bool:
        """Whether any string in a JSON-like value (keys included) spells a control token."""
        if isinstance(value, str):
            return self.has_control_text(value)
        if isinstance(value, dict):
            return any(self.contains_control_text(k) or self.contains_control_text(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return any(self.contains_control_text(x) for x in value)
        return False

    def _nested_control_text(self, messages: list[dict]) -> bool:
        return any(self.contains_control_text(v) for m in messages for v in m.values() if not isinstance(v, str))

    def _locate(self, messages, texts, prompt: str, render) -> list[tuple[str, bool]]:
        """The prompt as (text, is_client_text) pieces, found by rendering with each text between markers."""
        nonce = secrets.token_hex(8)
        marked = [dict(m) for m in messages]
        for n, (i, k, v) in enumerate(texts):
            marked[i][k] = f"\ue000{nonce}{n}a\ue001{v}\ue000{nonce}{n}b\ue001"
        rendered = render(marked)
        marker = re.compile(f"\ue000{nonce}(\\d+)([ab])\ue001")
        skeleton: list[tuple[str, int | None]] = []  # template text (None) or the index of a client text
        pos, open_at = 0, None
        for m in marker.finditer(rendered):
            n, side = int(m.group(1)), m.group(2)
            if side == "a":
                if open_at is not None:
                    raise self._unsafe()
                skeleton.append((rendered[pos : m.start()], None))
                open_at = (n, m.end())
            else:
                if open_at is None or open_at[0] != n or rendered[open_at[1] : m.start()] != texts[n][2]:
                    raise self._unsafe()  # the template changed the text inside the markers
                skeleton.append(("", n))
                open_at = None
            pos = m.end()
        if open_at is not None:
            raise self._unsafe()
        skeleton.append((rendered[pos:], None))
        for transform in (lambda s: s, str.strip):  # templates that `| trim` message text
            pieces = [(t, False) if n is None else (transform(texts[n][2]), True) for t, n in skeleton]
            if "".join(t for t, _ in pieces) == prompt:
                return pieces
        raise self._unsafe()

    @staticmethod
    def _unsafe() -> ValueError:
        return ValueError(
            "a message spells a special token of this model, and its chat template transforms message text so "
            "that it cannot be kept as plain text; remove the special-token text"
        )

    def _encode_pieces(self, pieces: list[tuple[str, bool]]) -> list[int]:
        """Split at the template's control tokens (with their lstrip/rstrip), encode the stretches as plain text."""
        items: list[str | int] = []  # stretches of text, and control token ids
        stretch = ""
        strip_next = False
        for text, is_client in pieces:
            if strip_next and text:
                text, strip_next = text.lstrip(), False
            if is_client:
                stretch += text
                continue
            pos = 0
            for m in self._control_re.finditer(text):
                token = self.controls[m.group(0)]
                before = text[pos : m.start()]
                stretch += before
                if token.lstrip:
                    stretch = stretch.rstrip()
                items.append(stretch)
                items.append(self._ids[m.group(0)])
                stretch = ""
                pos = m.end()
                if token.rstrip:
                    rest = text[pos:]
                    pos += len(rest) - len(rest.lstrip())
                    strip_next = pos == len(text)
            stretch += text[pos:]
        items.append(stretch)
        first, inner = self._plain_tokenizers()
        ids: list[int] = []
        for n, item in enumerate(items):
            if isinstance(item, int):
                ids.append(item)
            elif item:
                raw = first if n == 0 else inner
                ids.extend(raw.encode(item, add_special_tokens=False).ids)
        return ids
