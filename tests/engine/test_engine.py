"""Engine behaviour on a tiny random Llama with a real tokenizer: stop conditions, seeds, bad input,
aborts, and that nothing leaks KV blocks."""

from __future__ import annotations

import pytest

from lmforge.engine.engine import Engine
from lmforge.engine.errors import ContextLengthError, RequestError
from lmforge.messages import GenerationConfig, PytorchEngineConfig


@pytest.fixture(scope="module")
def engine(tiny_llama_dir) -> Engine:
    return Engine(
        tiny_llama_dir, PytorchEngineConfig(device_type="cpu", block_size=8, num_cpu_blocks=64, session_len=128)
    )


def run(engine: Engine, prompts: list[list[int]], gens: list[GenerationConfig]) -> dict:
    ids = [engine.add_request(p, g) for p, g in zip(prompts, gens, strict=True)]
    res = {i: {"text": "", "tokens": [], "finish": None} for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            r = res[out.request_id]
            r["text"] += out.text
            r["tokens"] += out.token_ids
            r["finish"] = out.finish_reason
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return [res[i] for i in ids]


def prompt(engine: Engine, text: str = "Once upon a time") -> list[int]:
    return engine.tokenizer.encode(text)


def test_max_new_tokens_and_length_finish(engine):
    (r,) = run(engine, [prompt(engine)], [GenerationConfig(max_new_tokens=7, ignore_eos=True)])
    assert len(r["tokens"]) == 7 and r["finish"] == "length"
    assert r["text"] == engine.tokenizer.decode(r["tokens"])


def test_stop_token_ids_stop_generation(engine):
    (free,) = run(engine, [prompt(engine)], [GenerationConfig(max_new_tokens=12, ignore_eos=True)])
    stop = free["tokens"][4]
    first = free["tokens"].index(stop)
    (r,) = run(engine, [prompt(engine)], [GenerationConfig(max_new_tokens=12, ignore_eos=True, stop_token_ids=[stop])])
    assert r["tokens"] == free["tokens"][: first + 1] and r["finish"] == "stop"
    assert r["text"] == engine.tokenizer.decode(free["tokens"][:first])  # the stop token is not in the text


def test_stop_words_never_leak(engine):
    (free,) = run(engine, [prompt(engine)], [GenerationConfig(max_new_tokens=24, ignore_eos=True)])
    text = free["text"].split("\ufffd")[0]  # a random model may emit stray UTF-8 bytes; stay before them
    assert len(text) > 3
    stop = text[2:4]
    (r,) = run(engine, [prompt(engine)], [GenerationConfig(max_new_tokens=24, ignore_eos=True, stop_words=[stop])])
    assert r["finish"] == "stop"
    assert r["text"] == text[: text.index(stop)]


def test_min_new_tokens_masks_stop_tokens(engine):
    (free,) = run(engine, [prompt(engine)], [GenerationConfig(max_new_tokens=6, ignore_eos=True)])
    stop = free["tokens"][0]  # what greedy decoding picks first, so only the mask keeps it out
    eos = engine.tokenizer.eos_token_ids
    gen = GenerationConfig(max_new_tokens=10, min_new_tokens=5, stop_token_ids=[stop])
    (r,) = run(engine, [prompt(engine)], [gen])
    assert len(r["tokens"]) >= 5 and not {stop, *eos} & set(r["tokens"][:5])
    # from token 6 on the stop ids work again
    assert r["finish"] == "length" or r["tokens"][-1] in {stop, *eos} and r["finish"] == "stop"


def test_stop_and_bad_words_take_one_string_or_a_list():
    assert GenerationConfig(stop_words="END").stop_words == ["END"]
    assert GenerationConfig(bad_words="x").bad_words == ["x"]
    for bad in ([""], [3], "", 7):
        with pytest.raises(ValueError, match="stop_words"):
            GenerationConfig(stop_words=bad)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("tp", 0, "tp must be an integer >= 1"),
        ("quant_policy", 3, "quant_policy must be 0"),
        ("kv_cache_dtype", "int8", "kv_cache_dtype must be"),
        ("distributed_executor_backend", "ray", "one process"),
        ("revision", "main", "never downloads"),
        ("download_dir", "/tmp", "never downloads"),
    ],
)
def test_engine_settings_that_are_invalid_or_would_be_ignored_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        PytorchEngineConfig(**{field: value})


def test_same_seed_same_tokens_whatever_the_batch(engine):
    gen = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.5, random_seed=1234, ignore_eos=True)
    other = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.0, ignore_eos=True)
    (alone,) = run(engine, [prompt(engine)], [gen])
    together = run(engine, [prompt(engine, "Paris"), prompt(engine), prompt(engine, "héllo")], [other, gen, other])
    assert together[1]["tokens"] == alone["tokens"]
    (diff,) = run(engine, [prompt(engine)], [GenerationConfig(**{**_fields(gen), "random_seed": 99})])
    assert diff["tokens"] != alone["tokens"]


def _fields(cfg):
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}


def test_logprobs_are_reported(engine):
    ids = engine.add_request(prompt(engine), GenerationConfig(max_new_tokens=3, ignore_eos=True, logprobs=2))
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == ids]
    lps = [lp for o in outs for lp in o.logprobs or []]
    assert len(lps) == 3
    for lp in lps:
        assert lp.logprob <= 0 and len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1]
        assert lp.top[0][0] == lp.token_id  # greedy picks the most likely token


def test_bad_requests_are_refused_and_others_keep_running(engine):
    ok = engine.add_request(prompt(engine), GenerationConfig(max_new_tokens=5, ignore_eos=True))
    with pytest.raises(ContextLengthError, match="128"):
        engine.add_request([5] * 200, GenerationConfig())
    with pytest.raises(RequestError, match="empty"):
        engine.add_request([], GenerationConfig())
    with pytest.raises(RequestError, match="token ids"):
        engine.add_request([1, 2, 100000], GenerationConfig())
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=-1)
    done = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == ok and out.finish_reason:
                done = out
    assert done is not None and done.num_generated_tokens == 5 and done.finish_reason == "length"


def test_abort_frees_blocks(engine):
    rid = engine.add_request(prompt(engine), GenerationConfig(max_new_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    out = engine.abort(rid)
    assert out.finish_reason == "abort"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished()


def test_generation_stops_at_session_len(engine):
    (r,) = run(engine, [[7] * 120], [GenerationConfig(max_new_tokens=50, ignore_eos=True)])
    assert len(r["tokens"]) == 8 and r["finish"] == "length"


def test_model_errors_are_clear(tmp_path, tiny_llama_dir):
    import json
    import shutil

    with pytest.raises(FileNotFoundError, match="does not exist"):
        Engine(str(tmp_path / "nope"), PytorchEngineConfig(device_type="cpu"))
    bad = tmp_path / "bad_arch"
    shutil.copytree(tiny_llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="FancyNewForCausalLM.*custom_module_map"):
        Engine(str(bad), PytorchEngineConfig(device_type="cpu"))


def test_bad_words_are_never_sampled(engine):
    (free,) = run(engine, [prompt(engine)], [GenerationConfig(max_new_tokens=6, ignore_eos=True)])
    banned = free["tokens"][0]
    word = engine.tokenizer.hf.convert_tokens_to_string([engine.tokenizer.hf.convert_ids_to_tokens(banned)])
    (r,) = run(engine, [prompt(engine)], [GenerationConfig(max_new_tokens=6, ignore_eos=True, bad_words=[word])])
    assert banned not in r["tokens"]
