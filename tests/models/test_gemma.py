"""Gemma parity with HF transformers on tiny random configs (fp32, CPU backend, tolerance 1e-4): (1 + w) RMSNorm, tanh-
GELU, scaled and tied embeddings. Each case runs a batch of prompts of different lengths through the engine; the
preemption case also prefills in 8-token chunks and runs out of KV blocks, so sequences are preempted and recomputed."""

from __future__ import annotations

import pytest

from lmforge.check_env.parity import PREEMPTION, run_parity

CASES = {
    "batch": {},
    "preemption": PREEMPTION,
}


@pytest.mark.parametrize("case", list(CASES))
def test_gemma_parity(case):
    result = run_parity("gemma", **CASES[case])
    assert result.passed, result.table()
    if case == "preemption":
        assert result.num_preemptions > 0
