"""Detokenizer on two small real tokenizers (byte-level BPE and SentencePiece-style byte-fallback BPE).

Streaming token by token must give exactly the text of a one-shot decode, never a partial character, and never any
part of a stop string or what follows it.
"""

from __future__ import annotations

import json
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lmforge.engine.detokenizer import Detokenizer

CORPUS = [
    "héllo wörld 你好 🙂",
    "Hello world, this is the end of the story.",
    "the cat sat on the mat; the cab was late",
    "naïve café ünïcödé straße",
    "日本語のテキスト 😀😃 👍🏽",
] * 3
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@cache
def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2 style: multi-byte characters that were not merged are split over several byte tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIALS,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], additional_special_tokens=SPECIALS[1:])


@cache
def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """Llama style: '▁' marks spaces, the decoder strips the first leading space, unknown chars fall back to bytes."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIALS, show_progress=False)
    )
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in model["merges"]], byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], additional_special_tokens=SPECIALS[1:])


TOKENIZERS = {"byte_level": byte_level_tokenizer, "sentencepiece": sentencepiece_tokenizer}
# Valid text without U+FFFD itself (a literal replacement character would be held back like a partial one).
texts = st.text(st.characters(exclude_characters="\ufffd", exclude_categories=("Cs",)), max_size=40)
rich_texts = st.lists(
    st.sampled_from(["héllo", " wörld", "你好", "🙂", "👍🏽", " the", "cat", "ß", "\n", "  "]), max_size=12
).map("".join)


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(detok: Detokenizer, ids: list[int], chunk: int = 1) -> tuple[list[str], bool]:
    """Feeds ids `chunk` at a time; returns the emitted deltas (flush included unless stopped) and the stop flag."""
    deltas = []
    for i in range(0, len(ids), chunk):
        delta, stopped = detok.step(ids[i : i + chunk])
        deltas.append(delta)
        if stopped:
            return deltas, True
    deltas.append(detok.flush())
    return deltas, False


def expected_text(tokenizer: PreTrainedTokenizerFast, prompt_ids: list[int], ids: list[int], skip: bool = True) -> str:
    """What a one-shot decode adds after the prompt (for SentencePiece the prompt decides the first space)."""
    full = tokenizer.decode(prompt_ids + ids, skip_special_tokens=skip)
    return full[len(tokenizer.decode(prompt_ids, skip_special_tokens=skip)) :]


@pytest.mark.parametrize("name", TOKENIZERS)
@settings(max_examples=60, deadline=None)
@given(prompt=texts | rich_texts, text=texts | rich_texts, chunk=st.integers(1, 4))
def test_streaming_equals_one_shot_decode(name, prompt, text, chunk):
    tokenizer = TOKENIZERS[name]()
    prompt_ids, ids = encode(tokenizer, prompt), encode(tokenizer, text)
    detok = Detokenizer(tokenizer, prompt_ids)
    deltas, stopped = stream(detok, ids, chunk)
    assert not stopped
    assert "".join(deltas) == expected_text(tokenizer, prompt_ids, ids) == detok.text
    assert not any("\ufffd" in d for d in deltas)
    if not prompt_ids:
        assert detok.text == tokenizer.decode(ids)


def test_multibyte_characters_wait_for_their_last_byte():
    tokenizer = byte_level_tokenizer()
    ids = encode(tokenizer, "aé€😀")  # unseen in training: split into single-byte tokens
    assert len(ids) > 4
    detok = Detokenizer(tokenizer, [])
    deltas = [detok.step([i])[0] for i in ids]
    assert [d for d in deltas if d] == ["a", "é", "€", "😀"]
    assert detok.flush() == ""


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(name, skip):
    tokenizer = TOKENIZERS[name]()
    special = tokenizer.convert_tokens_to_ids(SPECIALS)
    ids = [special[1]] + encode(tokenizer, "héllo wörld") + [special[2], special[0]] + encode(tokenizer, " 🙂 the end")
    detok = Detokenizer(tokenizer, encode(tokenizer, "the cat"), skip_special_tokens=skip)
    deltas, _ = stream(detok, ids)
    text = "".join(deltas)
    assert text == expected_text(tokenizer, encode(tokenizer, "the cat"), ids, skip)
    assert ("<|im_end|>" in text) != skip


@pytest.mark.parametrize("name", TOKENIZERS)
def test_stop_string_spanning_tokens_is_cut_exactly(name):
    tokenizer = TOKENIZERS[name]()
    ids = encode(tokenizer, "Hello world, this is the end of the story.")
    detok = Detokenizer(tokenizer, [], stop_words=["the end"])
    deltas, stopped = stream(detok, ids)
    assert stopped
    assert "".join(deltas) == detok.text == "Hello world, this is "
    assert detok.step(encode(tokenizer, " more")) == ("", True)
    assert detok.flush() == ""


def test_stop_string_ending_inside_a_token_is_cut_there():
    tokenizer = byte_level_tokenizer()
    ids = encode(tokenizer, "the cat sat on the mat")
    assert "Ġcat" in tokenizer.convert_ids_to_tokens(ids)  # "ca" ends inside this token
    detok = Detokenizer(tokenizer, [], stop_words=["ca"])
    deltas, stopped = stream(detok, ids)
    assert stopped and "".join(deltas) == "the "


def test_earliest_stop_string_in_one_step_wins():
    tokenizer = byte_level_tokenizer()
    detok = Detokenizer(tokenizer, [], stop_words=["on the", "sat", "at"])
    assert detok.step(encode(tokenizer, "the cat sat on the mat")) == ("the c", True)


def test_held_back_prefix_is_released_when_text_diverges():
    tokenizer = byte_level_tokenizer()
    stop = "the car"
    detok = Detokenizer(tokenizer, [], stop_words=[stop])
    ids = encode(tokenizer, "the cat sat. the cab, the ca")
    for i in range(len(ids)):
        delta, stopped = detok.step([ids[i]])
        assert not stopped
        decoded = tokenizer.decode(ids[: i + 1])
        assert decoded.startswith(detok.text)
        # exactly the longest tail that could still grow into the stop string is held back
        held = max((n for n in range(len(stop)) if decoded.endswith(stop[:n])), default=0)
        assert detok.text == decoded[: len(decoded) - held]
    assert detok.text == "the cat sat. the cab, "
    assert detok.flush() == "the ca"
    assert detok.text == "the cat sat. the cab, the ca"


@pytest.mark.parametrize("name", TOKENIZERS)
@settings(max_examples=60, deadline=None)
@given(data=st.data(), text=rich_texts | texts, chunk=st.integers(1, 3))
def test_stop_strings_never_leak(name, data, text, chunk):
    tokenizer = TOKENIZERS[name]()
    ids = encode(tokenizer, text)
    full = tokenizer.decode(ids)
    # stop words: substrings of the text (they will hit) and arbitrary ones (they mostly will not)
    pieces = st.integers(0, len(full)).flatmap(lambda i: st.integers(i + 1, len(full) + 1).map(lambda j: full[i:j]))
    stops = data.draw(st.lists(pieces.filter(bool) | st.text(min_size=1, max_size=4), max_size=3))
    detok = Detokenizer(tokenizer, [], stop_words=stops)
    deltas, stopped = stream(detok, ids, chunk)
    text = "".join(deltas)
    assert text == detok.text and full.startswith(text)
    assert stopped == any(w in full for w in stops)
    if stopped:
        # Cut at the start of a stop string, no later than the one that is complete first.
        assert any(full.startswith(w, len(text)) for w in stops)
        first_end = min(full.find(w) + len(w) for w in stops if w in full)
        assert all(full.find(w, 0, first_end) < 0 or full.find(w) >= len(text) for w in stops)
    else:
        assert text == full
    assert not any(w in detok.text for w in stops)


class CountingTokenizer:
    """Wraps a tokenizer to record how many ids each decode call sees."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast):
        self.tokenizer = tokenizer
        self.window_sizes: list[int] = []

    def decode(self, ids: list[int], **kwargs) -> str:
        self.window_sizes.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def test_each_step_decodes_only_a_small_window():
    tokenizer = byte_level_tokenizer()
    text = " ".join(CORPUS * 4)
    counting = CountingTokenizer(tokenizer)
    prompt_ids = encode(tokenizer, text)
    detok = Detokenizer(counting, prompt_ids, stop_words=["zzz"])
    ids = encode(tokenizer, text)
    deltas, _ = stream(detok, ids)
    assert "".join(deltas) == tokenizer.decode(ids)
    assert len(ids) > 300 and max(counting.window_sizes) <= 12
