"""Guided decoding: constrain sampling to a JSON grammar (OpenAI `response_format`) with xgrammar.

A request with a response_format gets one `Guide` (built by the server, or by the engine from
GenerationConfig.response_format); the sampler calls `fill_mask` on the request's logits row before sampling,
the engine calls `accept` with the sampled token and ends the request ('stop') once `is_terminated()`.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from typing import TYPE_CHECKING, Any

import torch

from .guided_limits import DEFAULT_SCHEMA_LIMITS, SchemaLimits, check_schema

if TYPE_CHECKING:
    import xgrammar

logger = logging.getLogger(__name__)

# Building a TokenizerInfo walks the whole vocabulary (~1 s for 50k tokens), so one compiler per tokenizer is kept;
# the compiler itself caches compiled grammars, so repeated schemas cost nothing. Its cache is bounded (a large
# schema takes a few MiB; distinct schemas would otherwise pile up forever); the oldest entries are evicted.
COMPILER_CACHE_BYTES = 64 * 2**20
_COMPILERS: dict[tuple, tuple[Any, xgrammar.GrammarCompiler]] = {}
_COMPILERS_LOCK = threading.Lock()


def _compiler(tokenizer_hf: Any, vocab_size: int, stop_token_ids: list[int] | None) -> xgrammar.GrammarCompiler:
    import xgrammar as xgr

    key = (id(tokenizer_hf), vocab_size, tuple(stop_token_ids or ()))
    with _COMPILERS_LOCK:
        entry = _COMPILERS.get(key)
        # The tokenizer object is kept in the entry so its id() cannot be reused by another object.
        if entry is None or entry[0] is not tokenizer_hf:
            # xgrammar reads transformers' tokenizer classes: lmforge's FastTokenizer lends its transformers twin
            hf = tokenizer_hf.to_transformers() if hasattr(tokenizer_hf, "to_transformers") else tokenizer_hf
            info = xgr.TokenizerInfo.from_huggingface(
                hf, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids) if stop_token_ids else None
            )
            compiler = xgr.GrammarCompiler(info, max_threads=2, cache_limit_bytes=COMPILER_CACHE_BYTES)
            entry = (tokenizer_hf, compiler)
            _COMPILERS[key] = entry
        return entry[1]


class Guide:
    """Per-request grammar state. Not thread-safe: one request's tokens come from one engine loop."""

    def __init__(self, compiled: xgrammar.CompiledGrammar, vocab_size: int, spec: dict | None = None) -> None:
        import xgrammar as xgr

        # the response_format it was compiled from: what an engine core in another process compiles again
        self.spec = spec
        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self.stop_token_ids = list(self.matcher.stop_token_ids)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # [1, ceil(vocab / 32)] int32, bit set = allowed
        self._shifts: torch.Tensor | None = None
        self.rejected_token: int | None = None

    def _allowed(self, device: torch.device) -> torch.Tensor:
        """The filled bitmask unpacked to bool [vocab_size] on `device`.

        Plain torch ops rather than xgrammar's own apply kernel, so the CPU tests cover the exact code that runs
        on a GPU, and no kernel needs compiling there.
        """
        if self._shifts is None or self._shifts.device != device:
            self._shifts = torch.arange(32, dtype=torch.int32, device=device)
        words = self._bitmask[0].to(device, non_blocking=True)
        bits = (words.unsqueeze(-1) >> self._shifts) & 1  # [num_words, 32], bit j of word i is token 32 * i + j
        return bits.flatten()[: self.vocab_size].bool()

    def fill_mask(self, logits_row: torch.Tensor) -> None:
        """Set the logits of tokens the grammar forbids to -inf, in place. `logits_row`: [vocab] (model vocab)."""
        if logits_row.dim() != 1:
            raise ValueError(f"fill_mask expects a 1-D logits row, got shape {tuple(logits_row.shape)}")
        if self.is_terminated():
            # Should not be asked again; allow only the stop tokens so the request ends cleanly.
            keep = logits_row[self.stop_token_ids].clone()
            logits_row.fill_(float("-inf"))
            logits_row[self.stop_token_ids] = keep
            return
        self.matcher.fill_next_token_bitmask(self._bitmask)
        num = min(self.vocab_size, logits_row.shape[0])
        allowed = self._allowed(logits_row.device)[:num]
        logits_row[:num].masked_fill_(~allowed, float("-inf"))
        # Ids past the tokenizer-aware vocab (padded model vocab) are never valid grammar tokens.
        logits_row[num:] = float("-inf")

    def accept(self, token_id: int) -> None:
        """Advance the grammar with the sampled token.

        A token the mask forbade (the sampler overrode it, e.g. every logit was -inf) cannot be undone; the guide
        then counts as terminated so the request ends instead of looping on a dead grammar. It never raises,
        because it runs inside the engine step.
        """
        if self.rejected_token is None and not self.matcher.accept_token(int(token_id)):
            self.rejected_token = int(token_id)
            logger.warning("token %d is outside the response_format grammar; ending the request", token_id)

    def is_terminated(self) -> bool:
        return self.rejected_token is not None or self.matcher.is_terminated()


def _schema_of(response_format: dict) -> dict | bool:
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise ValueError("response_format.json_schema must be an object with a 'schema' field")
    schema = spec.get("schema", spec.get("json_schema"))
    if schema is None:
        raise ValueError("response_format.json_schema.schema is required")
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ValueError(f"response_format.json_schema.schema is not valid JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError("response_format.json_schema.schema must be a JSON object")
    return schema


def _bound_strings(node: Any) -> Any:
    """Copy of a schema where length-bounded strings carry an equivalent `pattern`.

    xgrammar (<= 0.2.8, issue mlc-ai/xgrammar#800) lowers minLength/maxLength to a character class that admits raw
    control characters, so the output may not parse as JSON; its pattern path escapes correctly, and a pattern
    takes precedence over the length keywords.
    """
    if isinstance(node, list):
        return [_bound_strings(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _bound_strings(v) for k, v in node.items()}
    lo, hi = node.get("minLength"), node.get("maxLength")
    is_bound = all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) for v in (lo, hi))
    if (lo is not None or hi is not None) and is_bound and "pattern" not in node and "format" not in node:
        out["pattern"] = f"^.{{{lo or 0},{'' if hi is None else hi}}}$"
    return out


# xgrammar's messages start with a timestamp and its C++ source location: "[09:18:46] /project/cpp/x.cc:5082: "
_CPP_LOCATION = re.compile(r"\[\d{1,2}:\d{2}:\d{2}\]\s*|\S*\.(?:cc|cpp|cxx|h|hpp):\d+:\s*")


def _clean_error(exc: Exception) -> str:
    return _CPP_LOCATION.sub("", str(exc)).strip() or type(exc).__name__


def compile_response_format(
    response_format: dict,
    tokenizer_hf: Any,
    vocab_size: int,
    stop_token_ids: list[int] | None = None,
    limits: SchemaLimits = DEFAULT_SCHEMA_LIMITS,
) -> tuple[xgrammar.CompiledGrammar, int]:
    """Compile `response_format` ({'type': 'json_object'} or {'type': 'json_schema', 'json_schema': {'schema': ...}})
    into (grammar, vocab size); each request then takes its own `Guide(grammar, vocab_size)`.

    `vocab_size` is the model's (logits) vocab, which may exceed the tokenizer's. `stop_token_ids` end the
    grammar once it is complete (default: the tokenizer's eos). Raises ValueError for an unsupported type, a
    schema over `limits` or one the grammar library rejects. Compiling can take ~0.1 s: call it off the event loop.
    """
    if not isinstance(response_format, dict):
        raise ValueError("response_format must be an object")
    kind = response_format.get("type")
    if kind not in ("json_object", "json_schema"):
        raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    if kind == "json_schema":
        schema = _schema_of(response_format)
        check_schema(schema, limits)
    else:
        # OpenAI's json_object means "a JSON object"; xgrammar's builtin JSON grammar admits any value ([false]).
        schema = {"type": "object"}
    vocab_size = max(int(vocab_size), len(tokenizer_hf))
    compiler = _compiler(tokenizer_hf, vocab_size, stop_token_ids)
    try:
        # strict_mode forbids properties the schema does not name, and no free whitespace: small models
        # otherwise wander into endless extra keys or blanks instead of closing the object. An object of
        # json_object may hold any keys, so it is not strict.
        compiled = compiler.compile_json_schema(
            json.dumps(_bound_strings(schema)), strict_mode=kind == "json_schema", any_whitespace=False
        )
    except Exception as exc:  # xgrammar raises RuntimeError / its own errors for unsupported schemas
        raise ValueError(f"invalid response_format schema: {_clean_error(exc)}") from None
    return compiled, vocab_size


def build_guide(
    response_format: dict, tokenizer_hf: Any, vocab_size: int, stop_token_ids: list[int] | None = None
) -> Guide:
    """One request's Guide for `response_format` (see compile_response_format)."""
    return Guide(*compile_response_format(response_format, tokenizer_hf, vocab_size, stop_token_ids), response_format)
