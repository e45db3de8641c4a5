"""Weight sanity at load: NaN/Inf in any tensor, or checkpoint tensors no parameter takes, fail the load naming
them; --skip-weight-checks (check_weights=False) loads anyway. Controls: the clean checkpoint loads, and the old
behaviour (warn and go on) is what the opt-out gives."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.engine.model_loader import build_model
from lmforge.model_inputs import StepContextManager
from lmforge.model_source import load_model_source
from lmforge.weights.sanity import FiniteCheck

from .tiny_gguf import random_hf_weights, write_tiny_llama

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-hf")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def load(path, check_weights: bool = True):
    source = load_model_source(str(path), with_tokenizer=False)
    return build_model(source, torch.float32, CPU, StepContextManager(), check_weights=check_weights)


def edited_copy(src, dst, edit) -> str:
    """A copy of the HF folder whose safetensors tensors went through `edit(dict)`."""
    import shutil

    shutil.copytree(src, dst)
    file = dst / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return dst


def test_clean_checkpoint_loads(hf_folder):
    model = load(hf_folder)  # control: nothing to report
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensor_fails_the_load_naming_it(hf_folder, tmp_path, value, caplog):
    name = "model.layers.1.mlp.down_proj.weight"

    def poison(tensors):
        tensors[name][3, 5] = value

    path = edited_copy(hf_folder, tmp_path / "bad", poison)
    with pytest.raises(ValueError, match=r"NaN or Inf.*model\.layers\.1\.mlp\.down_proj\.weight"):
        load(path)
    with caplog.at_level(logging.WARNING):
        model = load(path, check_weights=False)  # the opt-out loads it and says so
    assert "down_proj" in caplog.text
    assert not torch.isfinite(dict(model.named_parameters())["model.layers.1.mlp.down_proj.weight"]).all()


def test_unused_checkpoint_tensor_fails_the_load_naming_it(hf_folder, tmp_path, caplog):
    def add_scales(tensors):  # what an FP8 (compressed-tensors) checkpoint carries next to each weight
        tensors["model.layers.0.self_attn.q_proj.weight_scale"] = torch.ones(1)
        tensors["model.layers.0.mlp.up_proj.input_scale"] = torch.ones(1)

    path = edited_copy(hf_folder, tmp_path / "extra", add_scales)
    with pytest.raises(ValueError, match=r"2 checkpoint tensors match no parameter.*q_proj\.weight_scale"):
        load(path)
    with caplog.at_level(logging.WARNING):
        load(path, check_weights=False)  # control: the opt-out gives the old behaviour, a log line
    assert "weight_scale" in caplog.text


def test_corrupted_gguf_fails_the_load(tmp_path):
    """The issue's GGUF with a stretch of its data overwritten with 0xFF: fp16 NaNs once dequantized."""
    clean = tmp_path / "clean.gguf"
    write_tiny_llama(str(clean), random_hf_weights())
    load(clean)  # control: the intact file loads
    data = bytearray(clean.read_bytes())
    start = len(data) // 2
    data[start : start + 4096] = b"\xff" * 4096
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="NaN or Inf") as info:
        load(broken)
    assert "model.layers." in str(info.value)  # names the damaged tensors


def test_integer_and_fp8_tensors_are_not_checked():
    """Quantized payloads (int packs, fp8) are bit patterns, not values: 0xFF bytes there are no error."""
    ones = torch.full((64,), 0xFF, dtype=torch.uint8)
    tensors = [("qweight", ones.view(torch.int8)), ("w_fp8", ones.view(torch.float8_e4m3fn))]
    check = FiniteCheck(tensors)
    assert [n for n, _ in check] == ["qweight", "w_fp8"]
    assert check.bad_tensors() == []
    # control: the same bytes as a 16-bit float are NaNs, and are named
    check = FiniteCheck([("w_fp16", ones.view(torch.float16))])
    list(check)
    assert check.bad_tensors() == ["w_fp16"]
