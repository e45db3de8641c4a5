"""Tokenizer: a thin wrapper over an HF tokenizer with the engine's needs (eos ids, chat template)."""

from __future__ import annotations

from typing import Any


class Tokenizer:
    def __init__(self, hf_tokenizer: Any, eos_token_ids: list[int] | None = None):
        self.hf = hf_tokenizer
        ids = list(eos_token_ids or [])
        if hf_tokenizer.eos_token_id is not None and hf_tokenizer.eos_token_id not in ids:
            ids.append(hf_tokenizer.eos_token_id)
        self.eos_token_ids = ids

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> str:
        """`template_kwargs` reach the template as variables (`tools`, `enable_thinking`, ...)."""
        if not self.has_chat_template:
            raise ValueError(
                "this model's tokenizer has no chat template; send a plain text prompt instead of messages"
            )
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a chat; the template already holds the special tokens, so none are added again."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)
