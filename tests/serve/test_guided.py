"""The xgrammar Guide on its own: random logits walked under the mask always give output that parses and
validates, padded vocab ids are never allowed, and bad response_formats are ValueErrors."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from lmforge.engine.guided import build_guide

from .conftest import TINY_VOCAB

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
}


def walk(guide, tokenizer, seed: int, max_steps: int = 300) -> tuple[str, list[int]]:
    """Sample random logits under the guide's mask until it terminates, like the engine's sampler would."""
    gen = torch.Generator().manual_seed(seed)
    tokens = []
    for _ in range(max_steps):
        logits = torch.randn(TINY_VOCAB, generator=gen)
        guide.fill_mask(logits)
        assert torch.isinf(logits[tokenizer.vocab_size :]).all(), "ids past the tokenizer vocab must stay masked"
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        guide.accept(token)
        tokens.append(token)
        if guide.is_terminated():
            break
    assert guide.is_terminated(), "the grammar did not finish"
    return tokenizer.decode(tokens), tokens


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_output_validates(tokenizer, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    guide = build_guide(fmt, tokenizer.hf, TINY_VOCAB)
    text, tokens = walk(guide, tokenizer, seed)
    assert tokens[-1] in tokenizer.eos_token_ids  # the grammar ends on a stop token, which decode() drops
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_output_is_an_object(tokenizer):
    guide = build_guide({"type": "json_object"}, tokenizer.hf, TINY_VOCAB)
    # json_object allows arbitrarily long strings, so the walk favours the closing characters to end soon.
    closers = [i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]) in ('"', "}", '"}', "{", "{}")]
    gen = torch.Generator().manual_seed(0)
    tokens = []
    while not guide.is_terminated() and len(tokens) < 500:
        logits = torch.randn(TINY_VOCAB, generator=gen)
        logits[closers] += 8.0
        guide.fill_mask(logits)
        token = int(torch.argmax(logits))
        guide.accept(token)
        tokens.append(token)
    assert guide.is_terminated()
    assert isinstance(json.loads(tokenizer.decode(tokens)), dict)


def test_first_token_must_open_the_object(tokenizer):
    guide = build_guide({"type": "json_schema", "json_schema": {"schema": PERSON}}, tokenizer.hf, TINY_VOCAB)
    logits = torch.zeros(TINY_VOCAB)
    guide.fill_mask(logits)
    allowed = torch.nonzero(torch.isfinite(logits)).flatten().tolist()
    assert allowed and all(tokenizer.decode([i]).startswith("{") for i in allowed)


def test_forbidden_token_ends_the_guide_without_raising(tokenizer):
    guide = build_guide({"type": "json_object"}, tokenizer.hf, TINY_VOCAB)
    letter = tokenizer.encode("x", add_special_tokens=False)[0]
    guide.accept(letter)  # a JSON object cannot start with 'x'
    assert guide.is_terminated() and guide.rejected_token == letter
    logits = torch.zeros(TINY_VOCAB)
    guide.fill_mask(logits)  # only stop tokens remain
    assert torch.isfinite(logits).nonzero().flatten().tolist() == sorted(guide.stop_token_ids)


def test_schema_given_as_string_and_stop_ids(tokenizer):
    fmt = {"type": "json_schema", "json_schema": {"schema": json.dumps({"type": "boolean"})}}
    guide = build_guide(fmt, tokenizer.hf, TINY_VOCAB, stop_token_ids=[0])
    assert guide.stop_token_ids == [0]
    text, tokens = walk(guide, tokenizer, 1)
    assert json.loads(text) in (True, False) and tokens[-1] == 0


@pytest.mark.parametrize(
    "fmt, match",
    [
        ({"type": "yaml"}, "response_format.type"),
        ({"type": "json_schema"}, "json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema is required"),
        ({"type": "json_schema", "json_schema": {"schema": "{not json"}}, "not valid JSON"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "object", "$ref": "#/nowhere"}}}, "schema"),
    ],
)
def test_bad_formats_raise_value_error(tokenizer, fmt, match):
    with pytest.raises(ValueError, match=match):
        build_guide(fmt, tokenizer.hf, TINY_VOCAB)


def test_fill_mask_wants_a_row(tokenizer):
    guide = build_guide({"type": "json_object"}, tokenizer.hf, TINY_VOCAB)
    with pytest.raises(ValueError, match="1-D"):
        guide.fill_mask(torch.zeros(2, TINY_VOCAB))


def test_length_bounded_strings_never_hold_raw_control_characters(tokenizer):
    """xgrammar#800: maxLength alone admits raw control characters; build_guide must still give valid JSON."""
    schema = {
        "type": "object",
        "properties": {"minLength": {"type": "string", "minLength": 1, "maxLength": 3}},
        "required": ["minLength"],
    }
    fmt = {"type": "json_schema", "json_schema": {"schema": schema}}
    control = [i for i in range(tokenizer.vocab_size) if any(ord(ch) < 0x20 for ch in tokenizer.decode([i]))]
    assert control, "the test needs tokens that decode to control characters"
    for seed in range(3):
        guide = build_guide(fmt, tokenizer.hf, TINY_VOCAB)
        gen = torch.Generator().manual_seed(seed)
        tokens = []
        while not guide.is_terminated() and len(tokens) < 100:
            logits = torch.randn(TINY_VOCAB, generator=gen)
            logits[control] += 20.0  # push hard towards the characters JSON forbids inside strings
            guide.fill_mask(logits)
            token = int(torch.argmax(logits))
            guide.accept(token)
            tokens.append(token)
        jsonschema.validate(json.loads(tokenizer.decode(tokens)), schema)


def test_mask_matches_xgrammars_own_kernel(tokenizer):
    """fill_mask unpacks the bitmask with torch ops (same code on CPU and GPU); it must agree with xgrammar's."""
    import xgrammar as xgr

    guide = build_guide({"type": "json_schema", "json_schema": {"schema": PERSON}}, tokenizer.hf, TINY_VOCAB)
    gen = torch.Generator().manual_seed(3)
    for _ in range(12):
        logits = torch.randn(TINY_VOCAB, generator=gen)
        ours = logits.clone()
        guide.fill_mask(ours)
        theirs = logits.clone().unsqueeze(0)
        xgr.apply_token_bitmask_inplace(theirs, guide._bitmask, vocab_size=guide.vocab_size)
        theirs[0, guide.vocab_size :] = float("-inf")
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs[0]))
        token = int(torch.argmax(ours))
        guide.accept(token)
