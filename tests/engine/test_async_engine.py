"""AsyncEngine: concurrent streams, abort by the consumer going away, errors before the first delta."""

from __future__ import annotations

import asyncio

import pytest

from lmforge.engine.async_engine import AsyncEngine
from lmforge.engine.errors import ContextLengthError
from lmforge.messages import GenerationConfig, PytorchEngineConfig


@pytest.fixture(scope="module")
def aengine(tiny_llama_dir):
    eng = AsyncEngine(
        tiny_llama_dir, PytorchEngineConfig(device_type="cpu", block_size=8, num_cpu_blocks=64, session_len=128)
    )
    yield eng
    asyncio.run(eng.close())


async def _collect(aengine, ids, gen):
    text, tokens, last = "", [], None
    async for out in aengine.generate(ids, gen):
        text += out.text
        tokens += out.token_ids
        last = out
    return text, tokens, last


def test_concurrent_streams_match_sequential(aengine):
    gen = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    prompts = [[3, 4, 5], [9, 10, 11, 12, 13], [20] * 11]

    async def main():
        seq = [await _collect(aengine, p, gen) for p in prompts]
        par = await asyncio.gather(*[_collect(aengine, p, gen) for p in prompts])
        return seq, par

    seq, par = asyncio.run(main())
    for (t1, k1, o1), (t2, k2, o2) in zip(seq, par, strict=True):
        assert k1 == k2 and t1 == t2 and o1.finish_reason == o2.finish_reason == "length"
        assert o2.num_generated_tokens == 8 and o2.num_prompt_tokens in (3, 5, 11)


def test_consumer_leaving_aborts_and_frees_blocks(aengine):
    async def main():
        agen = aengine.generate([3, 4, 5], GenerationConfig(max_new_tokens=100, ignore_eos=True))
        got = 0
        async for _ in agen:
            got += 1
            if got == 3:
                break
        await agen.aclose()
        for _ in range(200):  # the engine thread frees the blocks at its next turn
            s = aengine.stats()
            if s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main())


def test_errors_raise_before_first_delta(aengine):
    async def main():
        with pytest.raises(ContextLengthError):
            async for _ in aengine.generate([1] * 500, GenerationConfig()):
                pass
        # the engine keeps serving
        return await _collect(aengine, [3, 4], GenerationConfig(max_new_tokens=2, ignore_eos=True))

    _, tokens, last = asyncio.run(main())
    assert len(tokens) == 2 and last.finish_reason == "length"
