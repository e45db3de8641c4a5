"""A model folder's tokenizer read straight from `tokenizer.json` (the `tokenizers` library) and
`tokenizer_config.json`, without importing transformers.

`import transformers` for AutoTokenizer is the slowest part of a warm engine start: 11.4 s on the H200 machine
(transformers 5.17 pulls in torch._dynamo, torch.distributed.tensor, sympy, scipy and scikit-learn on the way), and
the tokenizer thread's imports hold the GIL that the main thread's CUDA graph capture needs (capture 3.5 s cold, 10-12 s
beside them). For the folders whose tokenizer is the generic fast tokenizer (`tokenizer_class`
PreTrainedTokenizerFast / TokenizersBackend: Llama 3, SmolLM, DeepSeek, ...), transformers itself only wraps the
`tokenizers` object that `tokenizer.json` describes; this class does the same wrapping and offers the part of the HF
tokenizer API that lmforge uses (encode, decode, `tokenizer(text)`, chat template, special tokens, vocabulary).
Model-specific tokenizer classes (which transformers 5 may rebuild from the vocabulary with their own normalizer),
remote code, and the Mistral folders transformers patches keep AutoTokenizer. `LMFORGE_TOKENIZER=transformers`
forces AutoTokenizer everywhere.
What needs a real transformers tokenizer (xgrammar's guided decoding) gets one from `to_transformers()`, loaded on
first use. `tests/test_fast_tokenizer.py` holds it to AutoTokenizer's output.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from typing import Any

from .chat_template import render_chat

GENERIC_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})
NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _content(token: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or a serialized AddedToken."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


def unsupported_reason(path: str) -> str | None:
    """Why `path`'s tokenizer needs transformers' AutoTokenizer (None: FastTokenizer reads it exactly)."""
    if os.environ.get("LMFORGE_TOKENIZER", "").lower() == "transformers":
        return "LMFORGE_TOKENIZER=transformers"
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return "no tokenizer.json"
    try:
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        model_type = str(_read_json(os.path.join(path, "config.json")).get("model_type", ""))
    except (OSError, ValueError) as e:
        return f"unreadable tokenizer config ({e})"
    cls = config.get("tokenizer_class")
    if cls not in GENERIC_CLASSES:
        return f"tokenizer_class {cls!r}"
    if "auto_map" in config:
        return "remote tokenizer code"
    if "mistral" in model_type:
        return "a Mistral folder (transformers may patch its pre-tokenizer)"
    return None


class Encoding(dict):
    """input_ids / attention_mask, as keys and as attributes (transformers' BatchEncoding without tensors)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class FastTokenizer:
    """The HF fast tokenizer of a model folder, over `tokenizers.Tokenizer` (see the module docstring)."""

    def __init__(self, path: str):
        from tokenizers import AddedToken, Tokenizer

        self.name_or_path = path
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        for key, value in _read_json(os.path.join(path, "special_tokens_map.json")).items():
            config.setdefault(key, value)
        tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        tok.no_truncation()  # as transformers' encode(): no truncation or padding unless asked
        tok.no_padding()
        self._tok = tok
        self._named = {k: _content(config.get(k)) for k in NAMED_SPECIAL if _content(config.get(k)) is not None}
        extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
        extra = extra.values() if isinstance(extra, dict) else extra
        self._extra = [c for c in (_content(t) for t in extra) if c is not None]

        # tokens the config declares that tokenizer.json lacks are added, the named and extra ones as special
        present = {t.content for t in tok.get_added_tokens_decoder().values()}
        missing = []
        for _, spec in sorted(((int(i), s) for i, s in (config.get("added_tokens_decoder") or {}).items())):
            if isinstance(spec, dict) and spec.get("content") not in present:
                fields = {k: spec[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in spec}
                missing.append(AddedToken(spec["content"], **fields))
                present.add(spec["content"])
        for content in [*self._named.values(), *self._extra]:
            if content not in present:
                missing.append(AddedToken(content, special=True))
                present.add(content)
        if missing:
            tok.add_tokens(missing)
        tok.encode_special_tokens = bool(config.get("split_special_tokens", False))
        # BOS/EOS come from tokenizer.json's post-processor: transformers ignores the config's add_bos_token /
        # add_eos_token for these generic classes (only model-specific classes rebuild the post-processor from them)
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.chat_template = self._read_chat_template(path, config)
        self._transformers = None
        self._transformers_lock = threading.Lock()

    @staticmethod
    def _read_chat_template(path: str, config: dict) -> str | dict | None:
        jinja = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                return f.read()
        template = _read_json(os.path.join(path, "chat_template.json")).get("chat_template")
        template = template if template is not None else config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            return {t["name"]: t["template"] for t in template}
        return template

    # ---- vocabulary and special tokens ------------------------------------------------------------------------
    @property
    def backend_tokenizer(self):
        return self._tok

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=False)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def added_tokens_decoder(self) -> dict:
        return dict(sorted(self._tok.get_added_tokens_decoder().items()))

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return dict(self._named)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys([*self._named.values(), *self._extra]))

    @property
    def all_special_ids(self) -> list[int]:
        return [i for i in (self._tok.token_to_id(t) for t in self.all_special_tokens) if i is not None]

    def __getattr__(self, name: str):
        # bos_token, eos_token_id, pad_token, ... (None when the config names none)
        if name in NAMED_SPECIAL:
            return self.__dict__.get("_named", {}).get(name)
        if name.endswith("_id") and name[:-3] in NAMED_SPECIAL:
            token = self.__dict__.get("_named", {}).get(name[:-3])
            return None if token is None else self._tok.token_to_id(token)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def convert_tokens_to_ids(self, tokens: str | list[str]):
        if isinstance(tokens, str):
            found = self._tok.token_to_id(tokens)
            return found if found is not None else self.unk_token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        special = set(self.all_special_ids) if skip_special_tokens else ()
        return [self._tok.id_to_token(i) for i in ids if i not in special]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        decoder = self._tok.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    # ---- text <-> ids -----------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | list[str], add_special_tokens: bool = True, **kwargs) -> Encoding:
        """`tokenizer(text).input_ids` as with transformers, for a text or a list of texts (no padding, no tensors:
        `to_transformers()` has the whole API)."""
        if kwargs:
            raise TypeError(f"FastTokenizer(text) takes add_special_tokens only, not {sorted(kwargs)}: use "
                            "to_transformers() for transformers' full tokenizer call")  # fmt: skip
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens)
            return Encoding(input_ids=ids, attention_mask=[1] * len(ids))
        rows = [self.encode(t, add_special_tokens) for t in text]
        return Encoding(input_ids=rows, attention_mask=[[1] * len(r) for r in rows])

    def decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None):
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        text = self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        clean = (
            self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        )
        # transformers 5 leaves BPE output alone: the clean-up (" ." -> ".") was made for WordPiece
        if clean and type(self._tok.model).__name__ != "BPE":
            for spaced, tight in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't")):
                text = text.replace(spaced, tight)
            for suffix in ("'m", "'s", "'ve", "'re"):
                text = text.replace(" " + suffix, suffix)
        return text

    def apply_chat_template(
        self,
        conversation: list,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **kwargs,
    ):
        template = chat_template if chat_template is not None else self.chat_template
        if isinstance(template, dict):
            template = template.get("tool_use" if tools is not None and "tool_use" in template else "default")
        if not template:
            raise ValueError("this tokenizer has no chat template (and none was passed)")
        text = render_chat(
            template, conversation, self.special_tokens_map, add_generation_prompt, tools, documents, **kwargs
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ---- the rest goes through transformers -------------------------------------------------------------------
    def to_transformers(self):
        """transformers' own tokenizer of the same folder (imported and loaded on the first call)."""
        with self._transformers_lock:
            if self._transformers is None:
                from transformers import AutoTokenizer

                self._transformers = AutoTokenizer.from_pretrained(self.name_or_path, local_files_only=True)
            return self._transformers

    def save_pretrained(self, out_dir: str) -> None:
        """The folder's tokenizer files, copied as they are."""
        os.makedirs(out_dir, exist_ok=True)
        for name in _FILES:
            src = os.path.join(self.name_or_path, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out_dir, name))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_transformers"], state["_transformers_lock"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._transformers_lock = threading.Lock()
