"""lmforge.fast_tokenizer (tokenizer.json without transformers) against transformers' AutoTokenizer on the same
folders: ids, text, special tokens, vocabulary and chat templates must be identical."""

import json
import os
import subprocess
import sys

import jinja2
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lmforge.fast_tokenizer import FastTokenizer, unsupported_reason
from lmforge.model_source import load_tokenizer
from tests.conftest import CHATML, make_tiny_tokenizer, tiny_bpe

CORPUS = ["The capital of France is Paris.", "héllo wörld 你好 🙂", "Don't stop: it's 3.5 km away, isn't it?"] * 20
TEXTS = [
    "Hello world!",
    " The capital of France is Paris.",
    "héllo wörld 你好 🙂\n\n\ttabs",
    "<|im_start|>user\nhi<|im_end|>",
    "a<|endoftext|>b <|im_end|>",
    "",
    "   ",
    "Don't stop : it 's 3.5 km away , isn 't it ?",
    "<tool>x</tool> [INST]",
]


def _bpe() -> Tokenizer:
    return tiny_bpe(CORPUS)


def _wordpiece() -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[CLS]", "[SEP]"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _folder(path, backend: Tokenizer, config_edits: dict | None = None, **special) -> str:
    """A tokenizer folder written by transformers, its tokenizer_config.json then edited as a release may have it."""
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    hf.chat_template = CHATML
    hf.save_pretrained(path)
    if config_edits:
        file = os.path.join(path, "tokenizer_config.json")
        with open(file) as f:
            config = json.load(f)
        config.update(config_edits)
        with open(file, "w") as f:
            json.dump(config, f)
    return str(path)


CHATML_SPECIAL = dict(eos_token="<|im_end|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>")
CASES = {
    "chatml": (_bpe, {}, CHATML_SPECIAL),
    "add_bos_eos": (_bpe, {"add_bos_token": True, "add_eos_token": True}, CHATML_SPECIAL),
    "no_bos_flag": (_bpe, {"add_bos_token": False}, CHATML_SPECIAL),
    "split_special": (_bpe, {"split_special_tokens": True}, CHATML_SPECIAL),
    "bpe_cleanup": (_bpe, {"clean_up_tokenization_spaces": True}, CHATML_SPECIAL),
    "wordpiece_cleanup": (
        _wordpiece,
        {"clean_up_tokenization_spaces": True, "add_bos_token": True},
        dict(unk_token="[UNK]", bos_token="[CLS]", eos_token="[SEP]"),
    ),
    "extra_specials": (
        _bpe,
        {
            "extra_special_tokens": ["<tool>", "</tool>"],
            "added_tokens_decoder": {
                "300": {"content": "[INST]", "special": False, "lstrip": False, "rstrip": False, "normalized": True}
            },
        },
        CHATML_SPECIAL,
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    make, edits, special = CASES[request.param]
    path = _folder(tmp_path_factory.mktemp(request.param), make(), edits, **special)
    assert unsupported_reason(path) is None
    return FastTokenizer(path), AutoTokenizer.from_pretrained(path, local_files_only=True)


def test_ids_and_text_equal_transformers(pair):
    fast, hf = pair
    for text in TEXTS:
        for add_special in (True, False):
            ids = fast.encode(text, add_special_tokens=add_special)
            assert ids == hf.encode(text, add_special_tokens=add_special), (text, add_special)
            for skip in (True, False):
                assert fast.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
                assert fast.decode(ids, skip, clean_up_tokenization_spaces=True) == hf.decode(
                    ids, skip_special_tokens=skip, clean_up_tokenization_spaces=True
                )
    assert (
        fast(TEXTS).input_ids == hf(TEXTS).input_ids and fast(TEXTS[0])["attention_mask"] == hf(TEXTS[0]).attention_mask
    )
    with pytest.raises(TypeError, match="to_transformers"):
        fast(TEXTS[0], return_tensors="pt")
    ids = list(range(len(hf)))
    assert fast.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert fast.convert_ids_to_tokens(ids, skip_special_tokens=True) == hf.convert_ids_to_tokens(ids, True)
    tokens = hf.convert_ids_to_tokens(ids[:40])
    assert fast.convert_tokens_to_string(tokens) == hf.convert_tokens_to_string(tokens)
    assert fast.convert_tokens_to_ids(tokens + ["never-a-token"]) == hf.convert_tokens_to_ids(
        tokens + ["never-a-token"]
    )


def test_vocabulary_and_special_tokens_equal_transformers(pair):
    fast, hf = pair
    assert len(fast) == len(hf) and fast.vocab_size == hf.vocab_size
    assert fast.get_vocab() == hf.get_vocab()
    assert fast.special_tokens_map == hf.special_tokens_map
    assert sorted(fast.all_special_ids) == sorted(hf.all_special_ids)
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(fast, name) == getattr(hf, name) and getattr(fast, name + "_id") == getattr(hf, name + "_id")
    ours = {i: (t.content, t.special) for i, t in fast.added_tokens_decoder.items()}
    assert ours == {i: (t.content, t.special) for i, t in hf.added_tokens_decoder.items()}


TEMPLATE = (
    "{% if tools %}{{ tools | tojson(indent=2) }}\n{% endif %}"
    "{% for m in messages %}{{ bos_token }}{{ m['role'] }}: "
    "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    "{% generation %}{{ m['content'] }}{% endgeneration %}"
    "{% if m.tool_calls is defined %}[calls]{% endif %}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}{% if greeting %}{{ greeting }}{% endif %}"
    "{% if messages | length > 9 %}{{ raise_exception('too many') }}{% endif %}"
)


def test_chat_templates_render_as_transformers_does(pair):
    fast, hf = pair
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"city": {"type": "string"}}}}]
    chats = [
        [{"role": "user", "content": "hi 你好"}],
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "tool_calls": None, "thinking": "say hello"},
            {"role": "user", "content": "<|im_end|> again?"},
        ],
    ]
    for chat in chats:
        for agp in (True, False):
            assert fast.apply_chat_template(chat, tokenize=False, add_generation_prompt=agp) == hf.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=agp
            )
            kw = dict(tools=tools, chat_template=TEMPLATE, add_generation_prompt=agp, greeting="héllo")
            assert fast.apply_chat_template(chat, tokenize=False, **kw) == hf.apply_chat_template(
                chat, tokenize=False, **kw
            )
            assert fast.apply_chat_template(chat, **kw) == hf.apply_chat_template(chat, return_dict=False, **kw)
    with pytest.raises(jinja2.exceptions.TemplateError, match="too many"):
        fast.apply_chat_template(chats[1] * 3, tokenize=False, chat_template=TEMPLATE)
    with pytest.raises(ValueError, match="empty conversation"):
        fast.apply_chat_template([], tokenize=False)


def test_load_tokenizer_uses_it_only_where_it_is_exact(tmp_path, monkeypatch):
    make_tiny_tokenizer(str(tmp_path / "generic"))
    assert isinstance(load_tokenizer(str(tmp_path / "generic"), []).hf, FastTokenizer)
    monkeypatch.setenv("LMFORGE_TOKENIZER", "transformers")
    assert unsupported_reason(str(tmp_path / "generic")) == "LMFORGE_TOKENIZER=transformers"
    assert not isinstance(load_tokenizer(str(tmp_path / "generic"), []).hf, FastTokenizer)
    monkeypatch.delenv("LMFORGE_TOKENIZER")
    specific = _folder(tmp_path / "specific", _bpe(), {"tokenizer_class": "GPT2Tokenizer"}, **CHATML_SPECIAL)
    assert unsupported_reason(specific) == "tokenizer_class 'GPT2Tokenizer'"
    assert not isinstance(load_tokenizer(specific, []).hf, FastTokenizer)
    remote = _folder(tmp_path / "remote", _bpe(), {"auto_map": {"AutoTokenizer": ["x.Tok", None]}}, **CHATML_SPECIAL)
    assert unsupported_reason(remote) == "remote tokenizer code"


def test_loading_it_does_not_import_transformers(tmp_path):
    make_tiny_tokenizer(str(tmp_path))
    code = (
        "import sys\nfrom lmforge.model_source import load_tokenizer\n"
        f"tok = load_tokenizer({str(tmp_path)!r}, [])\n"
        "ids = tok.encode_chat([{'role': 'user', 'content': 'hi'}])\n"
        "print(type(tok.hf).__name__, len(ids) > 0, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["FastTokenizer", "True", "False"], out.stderr


def test_guided_decoding_and_save_pretrained(tmp_path):
    from lmforge.engine.guided import build_guide

    make_tiny_tokenizer(str(tmp_path / "src"))
    fast = FastTokenizer(str(tmp_path / "src"))
    guide = build_guide({"type": "json_object"}, fast, len(fast))
    assert guide is not None
    fast.save_pretrained(str(tmp_path / "copy"))
    copy = AutoTokenizer.from_pretrained(str(tmp_path / "copy"), local_files_only=True)
    assert copy.encode(TEXTS[2]) == fast.encode(TEXTS[2]) and copy.chat_template == fast.chat_template


def test_embedded_gguf_tokenizer_is_read_without_transformers():
    """The embedded model's tokenizer, rebuilt once by transformers from the GGUF metadata and cached, is read back
    by FastTokenizer and equals transformers' reading of the same cache."""
    from importlib.metadata import version

    from lmforge.model_source import resolve_model_path
    from lmforge.weights.gguf import _tokenizer_cache, gguf_tokenizer

    path = resolve_model_path(None)
    gguf_tokenizer(path)  # builds the cache entry when missing
    fast = gguf_tokenizer(path)
    assert isinstance(fast, FastTokenizer)
    hf = PreTrainedTokenizerFast.from_pretrained(_tokenizer_cache(path, version("transformers")))
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert fast.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == hf.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )
    for text in TEXTS:
        ids = fast.encode(text)
        assert ids == hf.encode(text) and fast.decode(ids) == hf.decode(ids)
    assert (fast.eos_token_id, fast.bos_token_id, len(fast)) == (hf.eos_token_id, hf.bos_token_id, len(hf))
