"""Turning a request's options into what the sampler consumes: a grammar guide for response_format,
token ids for bad_words."""

from __future__ import annotations

import dataclasses

from lmforge.messages import GenerationConfig

from .errors import ContextLengthError, RequestError


def build_request_guide(tokenizer, vocab_size: int, response_format: dict):
    if tokenizer is None:
        raise RequestError("response_format needs a tokenizer; this model folder has none")
    from .guided import build_guide  # xgrammar is only needed for guided decoding

    try:
        return build_guide(response_format, tokenizer.hf, vocab_size, tokenizer.eos_token_ids)
    except ValueError as e:
        raise RequestError(f"invalid response_format: {e}") from e


def with_bad_word_ids(gen_config: GenerationConfig, tokenizer) -> GenerationConfig:
    """bad_words -> bad_token_ids: a word that is one token (alone or after a space) is never sampled."""
    ids = set(gen_config.bad_token_ids or ())
    for word in gen_config.bad_words:
        for variant in (word, " " + word):
            tokens = tokenizer.encode(variant, add_special_tokens=False)
            if len(tokens) == 1:
                ids.add(tokens[0])
    return dataclasses.replace(gen_config, bad_token_ids=sorted(ids))


def validate_request(input_ids: list[int], gen_config, vocab_size: int, session_len: int) -> None:
    """Raise RequestError/ContextLengthError for a request that cannot run (the engine's and its clients' check)."""
    if not input_ids:
        raise RequestError("the prompt is empty: give at least one token")
    if any((not isinstance(t, int)) or t < 0 or t >= vocab_size for t in input_ids):
        raise RequestError(f"token ids must be integers in [0, {vocab_size})")
    if len(input_ids) >= session_len:
        raise ContextLengthError(len(input_ids), session_len)
    gen_config.validate()
    if gen_config.logit_bias and max(gen_config.logit_bias) >= vocab_size:
        raise RequestError(f"logit_bias token ids must be in [0, {vocab_size})")
