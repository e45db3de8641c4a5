"""StableLM (StableLmForCausalLM) parity with HF transformers on tiny random configs (fp32, CPU backend, tolerance
1e-4): LayerNorm, partial rotary, optional per-head qk LayerNorm. Each case runs a batch of prompts of different
lengths through the engine; the preemption cases also prefill in 8-token chunks and run out of KV blocks, so
sequences are preempted and recomputed; tp2 runs two ranks over gloo."""

from __future__ import annotations

import pytest

from lmforge.check_env.parity import PREEMPTION, run_parity

CASES = {
    "batch": {},
    "preemption": PREEMPTION,
    "tp2_preemption": dict(engine_config={"tp": 2}, **PREEMPTION),
    "qk_layernorm_qkv_bias_tp2": dict(overrides=dict(qk_layernorm=True, use_qkv_bias=True), engine_config={"tp": 2}),
    "parallel_residual": dict(overrides=dict(use_parallel_residual=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_stablelm_parity(case):
    result = run_parity("stablelm", **CASES[case])
    assert result.passed, result.table()
    if "preemption" in case:
        assert result.num_preemptions > 0
