"""GPT-2 (GPT2LMHeadModel) parity with HF transformers on tiny random configs (fp32, CPU backend, tolerance 1e-4):
learned positions, Conv1D weights, fused c_attn, GELU MLP. Each case runs a batch of prompts of different lengths
through the engine; the preemption cases also prefill in 8-token chunks and run out of KV blocks, so sequences are
preempted and recomputed; tp2 runs two ranks over gloo."""

from __future__ import annotations

import pytest

from lmforge.check_env.parity import PREEMPTION, run_parity

CASES = {
    "batch": {},
    "preemption": PREEMPTION,
    "tp2_preemption": dict(engine_config={"tp": 2}, **PREEMPTION),
    "inverse_layer_idx_scale_relu": dict(
        overrides=dict(scale_attn_by_inverse_layer_idx=True, activation_function="relu")
    ),
    "exact_gelu_tp2": dict(overrides=dict(activation_function="gelu"), engine_config={"tp": 2}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gpt2_parity(case):
    result = run_parity("gpt2", **CASES[case])
    assert result.passed, result.table()
    if "preemption" in case:
        assert result.num_preemptions > 0
