"""pipeline(): prompt forms, batching, n, streaming, and folders without a tokenizer."""

from __future__ import annotations

import glob
import os
import shutil

import pytest

from lmforge import GenerationConfig, PytorchEngineConfig, pipeline

CFG = dict(device_type="cpu", block_size=8, num_cpu_blocks=64, session_len=128)


@pytest.fixture(scope="module")
def pipe(tiny_llama_dir):
    return pipeline(tiny_llama_dir, PytorchEngineConfig(**CFG))


def test_prompt_forms_and_batch_agree(pipe):
    gen = GenerationConfig(max_new_tokens=5, ignore_eos=True)
    text = "Once upon a time"
    ids = pipe.tokenizer.encode(text)
    messages = [{"role": "user", "content": text}]
    single = pipe(text, gen)
    batch = pipe([text, ids, messages], gen)
    assert single.token_ids == batch[0].token_ids == batch[1].token_ids
    assert single.input_token_len == len(ids) and single.generate_token_len == 5 and single.finish_reason == "length"
    assert batch[2].input_token_len == len(pipe.tokenizer.encode_chat(messages))
    assert batch[2].input_token_len > len(ids)


def test_stream_infer_deltas_concatenate_to_batch_result(pipe):
    gen = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    full = pipe("héllo", gen)
    deltas = list(pipe.stream_infer("héllo", gen))
    assert "".join(d.text for d in deltas) == full.text
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert deltas[-1].finish_reason == "length"


def test_n_samples_with_seed(pipe):
    gen = GenerationConfig(n=3, max_new_tokens=6, do_sample=True, temperature=2.0, random_seed=7, ignore_eos=True)
    outs = pipe("Paris", gen)
    assert [o.index for o in outs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in outs}) > 1
    assert [o.token_ids for o in pipe("Paris", gen)] == [o.token_ids for o in outs]


def test_bad_prompt_in_batch_adds_nothing(pipe):
    with pytest.raises(ValueError, match="session_len"):
        pipe(["fine", [5] * 500], GenerationConfig(max_new_tokens=2))
    assert not pipe.engine.has_unfinished()


def test_folder_without_tokenizer_serves_token_ids(tiny_llama_dir, tmp_path):
    bare = tmp_path / "bare"
    os.makedirs(bare)
    for f in glob.glob(os.path.join(tiny_llama_dir, "*")):
        name = os.path.basename(f)
        if name.endswith(".safetensors") or name == "config.json":
            shutil.copy(f, bare / name)
    p = pipeline(str(bare), PytorchEngineConfig(**CFG))
    out = p([3, 4, 5], GenerationConfig(max_new_tokens=3, ignore_eos=True))
    assert len(out.token_ids) == 3 and out.text == ""
    with pytest.raises(ValueError, match="token ids"):
        p("text needs a tokenizer")


def test_response_format_json_schema(pipe):
    import json

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    }
    gen = GenerationConfig(
        max_new_tokens=40, response_format={"type": "json_schema", "json_schema": {"schema": schema}}
    )
    out = pipe("Give me a city as JSON", gen)
    data = json.loads(out.text)
    assert set(data) == {"city"} and isinstance(data["city"], str)
    with pytest.raises(ValueError, match="response_format"):
        pipe("x", GenerationConfig(max_new_tokens=4, response_format={"type": "xml"}))
