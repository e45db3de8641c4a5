"""Llama parity with HF transformers on tiny random configs (fp32, CPU): logits of prefill and every
decode step through the paged cache for a batch of different lengths, with and without preemption."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.check_env.parity import engine_vs_hf

from .conftest import cpu_config, random_prompts, save_tiny

TOL = 1e-4


def _config(**kw) -> LlamaConfig:
    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(kw)
    return LlamaConfig(**base)


CASES = {
    "gqa": {},
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa_bias": dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True),
    "head_dim_32": dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32),
    "rope_linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "rope_dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=64),
    "rope_llama3": dict(
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_llama_parity(case, tiny_dir):
    cfg = _config(**CASES[case])
    hf = save_tiny(LlamaForCausalLM, cfg, tiny_dir)
    prompts = random_prompts(cfg.vocab_size, [5, 17, 9, 30])
    steps = 6
    if case == "rope_dynamic":  # HF rescales from the batch's longest position: compare one sequence, prefill only
        prompts, steps = random_prompts(cfg.vocab_size, [80]), 1
    # session_len past max_position_embeddings: dynamic NTK exists to run longer than the trained context
    res = engine_vs_hf(tiny_dir, prompts, steps, hf_model=hf, backend_config=cpu_config(session_len=256))
    assert res.max_abs_diff < TOL, res.table()
    assert res.tokens_equal, (res.engine_tokens, res.hf_tokens)


def test_llama_parity_with_preemption_and_chunked_prefill(tiny_dir):
    cfg = _config()
    hf = save_tiny(LlamaForCausalLM, cfg, tiny_dir)
    prompts = random_prompts(cfg.vocab_size, [7, 13, 21, 11, 25])
    # 24 blocks of 4 tokens cannot hold all five sequences at full length: the newest are preempted and
    # recomputed; a prefill budget of 8 tokens forces chunked prefill of every prompt
    res = engine_vs_hf(
        tiny_dir, prompts, 12, hf_model=hf, backend_config=cpu_config(num_cpu_blocks=24, max_prefill_token_num=8)
    )
    assert res.num_preemptions > 0
    assert res.max_abs_diff < TOL, res.table()
    assert res.tokens_equal


def test_llama_parity_prefix_caching(tiny_dir):
    cfg = _config()
    hf = save_tiny(LlamaForCausalLM, cfg, tiny_dir)
    shared = random_prompts(cfg.vocab_size, [16])[0]
    tails = random_prompts(cfg.vocab_size, [3, 6, 1], seed=1)
    prompts = [shared + t for t in tails]
    from lmforge.engine.engine import Engine

    engine = Engine(tiny_dir, cpu_config(enable_prefix_caching=True))
    first = engine_vs_hf(tiny_dir, prompts[:1], 4, hf_model=hf, engine=engine)
    rest = engine_vs_hf(tiny_dir, prompts[1:], 4, hf_model=hf, engine=engine)
    assert engine.block_manager.num_cache_hit_tokens >= 2 * 16
    assert max(first.max_abs_diff, rest.max_abs_diff) < TOL
    assert first.tokens_equal and rest.tokens_equal
