"""Cohere (CohereForCausalLM) parity with HF transformers on tiny random configs (fp32, CPU backend, tolerance 1e-4):
LayerNorm without bias, parallel residual, interleaved rotary, per-head q/k norms, logit scale. Each case runs a
batch of prompts of different lengths through the engine; the preemption cases also prefill in 8-token chunks and run
out of KV blocks, so sequences are preempted and recomputed; tp2 runs two ranks over gloo."""

from __future__ import annotations

import pytest

from lmforge.check_env.parity import PREEMPTION, run_parity

CASES = {
    "batch": {},
    "preemption": PREEMPTION,
    "tp2_preemption": dict(engine_config={"tp": 2}, **PREEMPTION),
    "no_qk_norm_bias": dict(overrides=dict(use_qk_norm=False, attention_bias=True)),
    "untied": dict(overrides=dict(tie_word_embeddings=False, logit_scale=0.5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cohere_parity(case):
    result = run_parity("cohere", **CASES[case])
    assert result.passed, result.table()
    if "preemption" in case:
        assert result.num_preemptions > 0
