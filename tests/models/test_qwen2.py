"""Qwen2 parity with HF transformers on tiny random configs (fp32, CPU backend, tolerance 1e-4): q/k/v bias, sliding
window on the layers `layer_types` marks (layer 1 of 2). Each case runs a batch of prompts of different lengths
through the engine; the preemption case also prefills in 8-token chunks and runs out of KV blocks, so sequences are
preempted and recomputed."""

from __future__ import annotations

import pytest

from lmforge.check_env.parity import PREEMPTION, run_parity

CASES = {
    "batch": {},
    "preemption": PREEMPTION,
    "qwen2_5_tied_no_window": dict(
        overrides=dict(use_sliding_window=False, sliding_window=None, layer_types=None, tie_word_embeddings=True)
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_qwen2_parity(case):
    result = run_parity("qwen2", **CASES[case])
    assert result.passed, result.table()
    if case == "preemption":
        assert result.num_preemptions > 0
