"""Built-in text for calibration and evaluation: the docstrings of a fixed list of standard-library modules,
read at run time with `inspect.getdoc`, so quantizing and measuring perplexity need no network and no data set.

Calibration and evaluation read disjoint module lists, so `lmforge eval`'s default text is held out from the
text `lmforge quantize` calibrates on. The text depends only on the Python version (docstrings change
between releases); for one interpreter it is the same on every run.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings

import torch

CALIBRATION_MODULES = (
    "json", "re", "collections", "argparse", "pathlib", "itertools", "functools", "typing", "datetime",
    "logging", "subprocess", "threading", "asyncio", "unittest", "email", "urllib.parse", "csv", "sqlite3",
    "decimal", "fractions", "random", "string", "shutil", "os", "dataclasses", "enum", "contextlib",
    "heapq", "bisect", "zipfile", "tarfile", "pickle", "copy", "socket", "selectors", "struct", "codecs",
)  # fmt: skip
EVALUATION_MODULES = (
    "statistics", "textwrap", "inspect", "difflib", "pprint", "http.client", "http.server", "ftplib",
    "imaplib", "smtplib", "mailbox", "configparser", "gzip", "bz2", "lzma", "tempfile", "glob", "fnmatch",
    "calendar", "locale", "gettext", "optparse", "getopt", "shlex", "cmd", "queue", "sched", "weakref",
    "abc", "numbers", "operator", "array", "base64", "binascii", "hashlib", "hmac", "secrets", "uuid",
    "ipaddress", "xml.dom.minidom", "xml.etree.ElementTree", "html.parser", "wave", "colorsys", "doctest",
    "trace", "timeit", "tokenize", "ast", "dis", "pdb", "traceback", "warnings", "zoneinfo",
)  # fmt: skip


def _docstrings(module_name: str) -> list[str]:
    """The module's docstring, then those of its public classes, their public methods and its functions, in
    source-definition order (dir() is sorted, so the order does not depend on the interpreter's hashing)."""
    with warnings.catch_warnings():  # importing or touching deprecated names (typing.re) warns; we only read docs
        warnings.simplefilter("ignore")
        return _collect(importlib.import_module(module_name))


def _collect(module) -> list[str]:
    docs, seen = [], set()

    def add(obj) -> None:
        doc = inspect.getdoc(obj)
        if doc and doc not in seen:
            seen.add(doc)
            docs.append(doc)

    add(module)
    for name in sorted(dir(module)):
        if name.startswith("_"):
            continue
        obj = getattr(module, name, None)
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # re-exported from elsewhere: documented where it is defined
        if inspect.isclass(obj):
            add(obj)
            for member_name in sorted(vars(obj)):
                if not member_name.startswith("_") and callable(vars(obj)[member_name]):
                    add(getattr(obj, member_name, None))
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            add(obj)
    return docs


@functools.lru_cache(maxsize=2)
def builtin_text(split: str = "calibration") -> str:
    """The whole built-in text of `split` ('calibration' or 'evaluation'), paragraphs separated by blank lines."""
    modules = {"calibration": CALIBRATION_MODULES, "evaluation": EVALUATION_MODULES}.get(split)
    if modules is None:
        raise ValueError(f"unknown built-in text split {split!r}; expected 'calibration' or 'evaluation'")
    return "\n\n".join(doc for name in modules for doc in _docstrings(name))


def encode_prefix(tokenizer, text: str, num_tokens: int | None) -> list[int]:
    """Token ids of the text's start, at least num_tokens of them when the text has that many (None: all of it):
    prefixes of growing length are encoded, so a short calibration does not tokenize the whole text. The last
    token of a cut prefix may differ from the whole text's, so one spare token is dropped."""
    if num_tokens is None:
        return tokenizer.encode(text, add_special_tokens=False)
    chars = 4 * (num_tokens + 1)
    while True:
        ids = tokenizer.encode(text[:chars], add_special_tokens=False)
        if chars >= len(text):
            return ids
        if len(ids) > num_tokens:
            return ids[:-1]
        chars *= 2


def token_blocks(token_ids: list[int], num_blocks: int | None, block_len: int) -> torch.Tensor:
    """Consecutive, non-overlapping blocks `[num_blocks, block_len]` (int64) from the start of `token_ids`;
    num_blocks None takes every full block. Too little text for the ask is an error, not fewer blocks."""
    if block_len < 2:
        raise ValueError(f"sequence length must be at least 2 tokens, got {block_len}")
    available = len(token_ids) // block_len
    if num_blocks is None:
        num_blocks = available
    if num_blocks < 1 or num_blocks > available:
        raise ValueError(
            f"the text has {len(token_ids)} tokens, enough for {available} blocks of {block_len}, but "
            f"{num_blocks} were asked for; lower the number of samples or the sequence length, or give more text"
        )
    return torch.tensor(token_ids[: num_blocks * block_len], dtype=torch.int64).view(num_blocks, block_len)
