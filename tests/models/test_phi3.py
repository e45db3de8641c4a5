"""Phi3 parity with HF transformers on tiny random configs (fp32, CPU backend, tolerance 1e-4): q/k/v and gate/up stored
merged in the checkpoint. Each case runs a batch of prompts of different lengths through the engine; the preemption
case also prefills in 8-token chunks and runs out of KV blocks, so sequences are preempted and recomputed."""

from __future__ import annotations

import pytest

from lmforge.check_env.parity import PREEMPTION, run_parity

CASES = {
    "batch": {},
    "preemption": PREEMPTION,
    # every prompt is longer than original_max_position_embeddings, so every step uses the long factors: the engine
    # picks them per step, HF per forward, and these agree only when no batch mixes short and long sequences
    "longrope_partial_rotary_window": dict(
        prompt_lengths=(20, 25, 17, 30),
        overrides=dict(
            sliding_window=8,
            max_position_embeddings=256,
            original_max_position_embeddings=16,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.1, 1.2, 1.3],
                "long_factor": [1.5, 2.0, 3.0, 4.0],
            },
        ),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_phi3_parity(case):
    result = run_parity("phi3", **CASES[case])
    assert result.passed, result.table()
    if case == "preemption":
        assert result.num_preemptions > 0
