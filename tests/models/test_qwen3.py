"""Qwen3 parity with HF transformers on tiny random configs (fp32, CPU backend, tolerance 1e-4): per-head RMSNorm of q
and k. Each case runs a batch of prompts of different lengths through the engine; the preemption case also prefills
in 8-token chunks and runs out of KV blocks, so sequences are preempted and recomputed."""

from __future__ import annotations

import pytest

from lmforge.check_env.parity import PREEMPTION, run_parity

CASES = {
    "batch": {},
    "preemption": PREEMPTION,
    "bias_tied": dict(overrides=dict(attention_bias=True, tie_word_embeddings=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_qwen3_parity(case):
    result = run_parity("qwen3", **CASES[case])
    assert result.passed, result.table()
    if case == "preemption":
        assert result.num_preemptions > 0
