"""Gemma3 parity with HF transformers on tiny random configs (fp32, CPU backend, tolerance 1e-4): q/k norms, local and
global layers with their own rope base, sliding window. Each case runs a batch of prompts of different lengths
through the engine; the preemption case also prefills in 8-token chunks and runs out of KV blocks, so sequences are
preempted and recomputed."""

from __future__ import annotations

import pytest

from lmforge.check_env.parity import PREEMPTION, run_parity

CASES = {
    "batch": {},
    "preemption": PREEMPTION,
    "linear_rope_on_global_layers": dict(
        overrides=dict(
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            }
        )
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gemma3_parity(case):
    result = run_parity("gemma3_text", **CASES[case])
    assert result.passed, result.table()
    if case == "preemption":
        assert result.num_preemptions > 0
