"""Incremental detokenizer: one per sequence; the engine feeds it each step's new token ids and streams the text.

Decoding token by token is wrong for two reasons: SentencePiece drops the leading space of the first token it
decodes, and byte-level BPE splits multi-byte characters over several tokens. So each step decodes a short window
of already emitted tokens plus the new ones and emits only the difference; while that ends in a partial character
('\ufffd') the tokens wait. Stop strings are cut on the text side; text that may still start one is held back.

Byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen, SmolLM, ...) have a faster exact path: every token is a
fixed byte string, so a step appends bytes to an incremental UTF-8 decoder (a table lookup per token instead of
two tokenizer calls). The table is built once per tokenizer and checked against tokenizer.decode first.
"""

from __future__ import annotations

import codecs
import json
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
        self._table = token_bytes_table(tokenizer)
        if self._table is not None:
            self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    @property
    def text(self) -> str:
        """All text emitted so far (without held-back text)."""
        return self._text

    def step(self, new_token_ids: list[int]) -> tuple[str, bool]:
        """Returns (text to emit now, whether a stop string was hit). After a hit, further calls return ('', True)."""
        if self._stopped:
            return "", True
        if self._table is not None:
            delta = self._utf8.decode(self._bytes_of(new_token_ids))
        else:
            self._ids.extend(new_token_ids)
            delta = self._decode_new(final=False)
        if not delta:
            return "", False
        if not self.stop_words:  # nothing to cut or hold back
            self._text += delta
            return delta, False
        return self._emit(delta)

    def flush(self) -> str:
        """At finish (length, eos, abort): whatever is still held back, partial characters included."""
        if self._stopped:
            return ""
        tail = self._utf8.decode(b"", final=True) if self._table is not None else self._decode_new(final=True)
        text = self._held + tail
        self._held = ""
        cut = _find_stop(text, self.stop_words)
        if cut >= 0:
            text = text[:cut]
            self._stopped = True
        self._text += text
        return text

    def _bytes_of(self, ids: list[int]) -> bytes:
        pieces, specials = self._table
        n = len(pieces)  # ids past the tokenizer's vocabulary (a padded model vocab) decode to nothing
        if len(ids) == 1:  # the engine's case: one token a step
            i = ids[0]
            return pieces[i] if i < n and not (self.skip_special_tokens and i in specials) else b""
        if self.skip_special_tokens:
            return b"".join(pieces[i] for i in ids if i < n and i not in specials)
        return b"".join(pieces[i] for i in ids if i < n)

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


def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-to-printable-character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _build_token_bytes(tokenizer) -> tuple[list[bytes], frozenset[int]] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or json.loads(backend.to_str()).get("decoder", {}) is None:
        return None
    if json.loads(backend.to_str())["decoder"].get("type") != "ByteLevel":
        return None
    byte_of = _byte_decoder()
    added = {i: t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    vocab = backend.get_vocab(with_added_tokens=True)
    pieces = [b""] * (max(vocab.values()) + 1)
    for piece, i in vocab.items():
        if i in added:
            pieces[i] = added[i].content.encode()
        elif all(c in byte_of for c in piece):
            pieces[i] = bytes(byte_of[c] for c in piece)
        else:
            return None
    specials = frozenset(i for i, t in added.items() if t.special)
    # trust the table only if it reproduces the tokenizer's own decoding
    sample = "Hello wörld, 你好 🙂 <tag> x=1;\n\tdone."
    ids = tokenizer.encode(sample, add_special_tokens=False) + sorted(specials)[:4]
    for skip in (True, False):
        want = tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        got = b"".join(pieces[i] for i in ids if not (skip and i in specials)).decode("utf-8", "replace")
        if got != want:
            return None
    return pieces, specials


def token_bytes_table(tokenizer) -> tuple[list[bytes], frozenset[int]] | None:
    """(bytes of each token id, special token ids) for byte-level BPE tokenizers; None otherwise. Cached."""
    cached = getattr(tokenizer, "_lmforge_token_bytes", False)
    if cached is False:
        cached = _build_token_bytes(tokenizer)
        try:
            tokenizer._lmforge_token_bytes = cached
        except AttributeError:
            pass
    return cached
