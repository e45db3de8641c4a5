"""Tokenizer: a thin wrapper over an HF tokenizer with the engine's needs (eos ids, chat template, and
special-token-safe encoding of client text: lmforge.safe_tokens)."""

from __future__ import annotations

import threading
from typing import Any


class Tokenizer:
    def __init__(self, hf_tokenizer: Any, eos_token_ids: list[int] | None = None):
        self.hf = hf_tokenizer
        ids = list(eos_token_ids or [])
        if hf_tokenizer.eos_token_id is not None and hf_tokenizer.eos_token_id not in ids:
            ids.append(hf_tokenizer.eos_token_id)
        self.eos_token_ids = ids
        self._chat_encoder = None
        self._chat_encoder_lock = threading.Lock()

    @property
    def chat_encoder(self):
        """The special-token-safe encoder (built on first use: it copies the backend tokenizer)."""
        with self._chat_encoder_lock:
            if self._chat_encoder is None:
                from .safe_tokens import ChatEncoder

                self._chat_encoder = ChatEncoder(self.hf)
            return self._chat_encoder

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        """`parse_special=False`: text that spells a control token ('<|im_end|>') is tokenized as ordinary text."""
        if not parse_special and self.chat_encoder.has_control_text(text):
            return self.chat_encoder.encode_plain(text, add_special_tokens)
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> str:
        """The rendered chat; `template_kwargs` (tools=..., ...) go to the template."""
        if not self.has_chat_template:
            raise ValueError(
                "this model's tokenizer has no chat template; send a plain text prompt instead of messages"
            )
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> list[int]:
        """Token ids of a chat; the template already holds the special tokens, so none are added again. Control
        tokens come only from the template: message text spelling one is tokenized as plain text."""

        if template_kwargs and self.chat_encoder.contains_control_text(template_kwargs):
            # tool definitions and the like are rendered into the prompt as they are: they cannot be kept plain
            raise ValueError("chat template arguments (e.g. tool definitions) must not spell special tokens")

        def render(msgs: list[dict]) -> str:
            return self.apply_chat_template(msgs, add_generation_prompt, **template_kwargs)

        return self.chat_encoder.encode_chat(messages, render)
