import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


TINY_CORPUS = ["The capital of France is Paris.", "héllo wörld 你好 🙂", "Once upon a time there was a model."] * 20


def tiny_bpe(corpus: list[str] = TINY_CORPUS):
    """A `tokenizers` byte-level BPE (vocab 300) trained on `corpus` in milliseconds, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def make_tiny_tokenizer(path: str) -> None:
    """A small byte-level BPE tokenizer with ChatML special tokens, saved HF-style into `path`."""
    from transformers import PreTrainedTokenizerFast

    tok = tiny_bpe()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    hf.chat_template = CHATML
    hf.save_pretrained(path)


def tiny_llama_config(tok, **overrides):
    """The LlamaConfig of the tests' tiny models (vocab 320, hidden 64, 2 layers, 4 heads / 2 kv heads) for the
    tokenizer `make_tiny_tokenizer` wrote."""
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return LlamaConfig(**{**fields, **overrides})


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A tiny random Llama (vocab 320) with a tokenizer, as an HF folder."""
    from transformers import LlamaForCausalLM

    path = str(tmp_path_factory.mktemp("tiny_llama"))
    make_tiny_tokenizer(path)
    from transformers import AutoTokenizer

    cfg = tiny_llama_config(AutoTokenizer.from_pretrained(path), tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(params=["kernels", "torch"])
def cpu_kernel_mode(request, monkeypatch):
    """Runs a test twice: with lmforge's compiled CPU kernels (lmforge/kernels/cpu) and with them off, as on a
    machine without a C compiler (the plain-torch path). Yields the mode's name."""
    from lmforge.kernels import cpu as cpu_kernels

    if request.param == "torch":
        monkeypatch.setattr(cpu_kernels, "_lib", None)
        monkeypatch.setattr(cpu_kernels, "_tried", True)
    elif not cpu_kernels.available():
        pytest.fail("the CPU kernels did not build on this machine (a C compiler is part of the test setup)")
    yield request.param
