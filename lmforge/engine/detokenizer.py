"""Incremental detokenizer: one per sequence; the engine feeds it each step's new token ids and streams the text.

Decoding token by token is wrong for two reasons: SentencePiece drops the leading space of the first token it
decodes, and byte-level BPE splits multi-byte characters over several tokens. So each step decodes a short window
of already emitted tokens plus the new ones and emits only the difference; while that ends in a partial character
('\ufffd') the tokens wait. Stop strings are cut on the text side; text that may still start one is held back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Prompt tokens used as left context for the first generated token (enough for any leading-space rule).
_CONTEXT_TOKENS = 5


class Detokenizer:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        stop_words: list[str] | None = None,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop_words = [w for w in stop_words or () if w]
        # Window of token ids: [:_read] already turned into text (left context), [_read:] not yet.
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._read = len(self._ids)
        self._held = ""  # decoded text that might be the start of a stop string
        self._text = ""
        self._stopped = False

    @property
    def text(self) -> str:
        """All text emitted so far (without held-back text)."""
        return self._text

    def step(self, new_token_ids: list[int]) -> tuple[str, bool]:
        """Returns (text to emit now, whether a stop string was hit). After a hit, further calls return ('', True)."""
        if self._stopped:
            return "", True
        self._ids.extend(new_token_ids)
        delta = self._decode_new(final=False)
        if not delta:
            return "", False
        return self._emit(delta)

    def flush(self) -> str:
        """At finish (length, eos, abort): whatever is still held back, partial characters included."""
        if self._stopped:
            return ""
        text = self._held + self._decode_new(final=True)
        self._held = ""
        cut = _find_stop(text, self.stop_words)
        if cut >= 0:
            text = text[:cut]
            self._stopped = True
        self._text += text
        return text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _decode_new(self, final: bool) -> str:
        """Text of the unread tokens, or '' while it is empty or ends in a partial character (unless final)."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[: self._read])
        full_text = self._decode(self._ids)
        if not final and (len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd")):
            return ""
        # The emitted tokens become the next window's left context; older ones are no longer needed.
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        return full_text[len(prefix_text) :]

    def _emit(self, delta: str) -> tuple[str, bool]:
        text = self._held + delta
        cut = _find_stop(text, self.stop_words)
        if cut >= 0:
            self._held = ""
            self._stopped = True
            self._text += text[:cut]
            return text[:cut], True
        keep = _partial_stop_len(text, self.stop_words)
        out, self._held = text[: len(text) - keep], text[len(text) - keep :]
        self._text += out
        return out, False


def _find_stop(text: str, stop_words: list[str]) -> int:
    """Index of the earliest stop string occurrence in text, -1 if none."""
    hits = [i for i in (text.find(w) for w in stop_words) if i >= 0]
    return min(hits, default=-1)


def _partial_stop_len(text: str, stop_words: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    longest = 0
    for word in stop_words:
        for n in range(min(len(word) - 1, len(text)), longest, -1):
            if text.endswith(word[:n]):
                longest = n
                break
    return longest
