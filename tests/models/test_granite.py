"""Granite (GraniteForCausalLM) parity with HF transformers on tiny random configs (fp32, CPU backend, tolerance 1e-4):
embedding, residual, attention and logit multipliers. Each case runs a batch of prompts of different lengths through
the engine; the preemption cases also prefill in 8-token chunks and run out of KV blocks, so sequences are preempted
and recomputed; tp2 runs two ranks over gloo."""

from __future__ import annotations

import pytest

from lmforge.check_env.parity import PREEMPTION, run_parity

CASES = {
    "batch": {},
    "preemption": PREEMPTION,
    "tp2_preemption": dict(engine_config={"tp": 2}, **PREEMPTION),
    "bias": dict(overrides=dict(attention_bias=True, mlp_bias=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_granite_parity(case):
    result = run_parity("granite", **CASES[case])
    assert result.passed, result.table()
    if "preemption" in case:
        assert result.num_preemptions > 0
