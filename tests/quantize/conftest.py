"""A tiny random Llama with a tokenizer and LLM-like activation outliers, and its checkpoints quantized once per
method by `quantize_model` (session-scoped: the tests read them, none writes them)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from lmforge.quantize.layerwise import QuantizeOptions, quantize_model
from tests.conftest import make_tiny_tokenizer, tiny_llama_config

GROUP = 32  # hidden 64: group 128 would not divide K
CALIB = dict(calib_samples=8, calib_seq_len=64)


@pytest.fixture(scope="session")
def outlier_llama_dir(tmp_path_factory) -> str:
    """Llama (2 layers, hidden 64) whose norms give a few channels 10x the others, as trained LLMs have: the
    case AWQ's per-channel scales exist for."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = str(tmp_path_factory.mktemp("outlier_llama"))
    make_tiny_tokenizer(path)
    cfg = tiny_llama_config(AutoTokenizer.from_pretrained(path), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[torch.randperm(64, generator=gen)[:4]] *= 10
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def quantized(outlier_llama_dir, tmp_path_factory):
    """method -> folder of outlier_llama quantized by it (group 32; AWQ / GPTQ calibrated on 8 x 64 tokens)."""
    cache: dict[str, str] = {}

    def get(method: str, **kw) -> str:
        key = method + repr(sorted(kw.items()))
        if key not in cache:
            out = str(tmp_path_factory.mktemp(f"q_{method}"))
            opts = QuantizeOptions(method=method, group_size=GROUP, progress=False, **{**CALIB, **kw})
            quantize_model(outlier_llama_dir, out, opts)
            cache[key] = out
        return cache[key]

    return get


def load_awq_packing_utils():
    """AutoAWQ's own pack/unpack module (awq/utils/packing_utils.py, pure torch). Importing the `awq` package
    itself would pull in `datasets` and its CUDA kernels, so the one file is loaded by path."""
    stub = sys.modules.get("awq")  # tests/quant may have put a bare package object there (no __spec__)
    locations = list(getattr(stub, "__path__", None) or []) if stub is not None else []
    if not locations:
        spec = importlib.util.find_spec("awq")
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        pytest.skip("autoawq is not installed (pip install --no-deps autoawq==0.2.9; see scripts/setup.sh)")
    path = os.path.join(locations[0], "utils", "packing_utils.py")
    module_spec = importlib.util.spec_from_file_location("awq_packing_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def read_checkpoint(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    import json

    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    return config, load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tensors are tiny, and on a shared 2-core machine a second spinning thread
    makes each small matmul tens of times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
