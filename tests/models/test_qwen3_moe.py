"""Qwen3-MoE parity with HF transformers on tiny random configs (fp32, CPU backend, tolerance 1e-4): q/k norms, 4
experts top-2 through FusedMoE, norm_topk_prob. Each case runs a batch of prompts of different lengths through the
engine; the preemption case also prefills in 8-token chunks and runs out of KV blocks, so sequences are preempted and
recomputed."""

from __future__ import annotations

import pytest

from lmforge.check_env.parity import PREEMPTION, run_parity

CASES = {
    "batch": {},
    "preemption": PREEMPTION,
    "dense_first_layer_unnormalised": dict(overrides=dict(mlp_only_layers=[0], norm_topk_prob=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_qwen3_moe_parity(case):
    result = run_parity("qwen3_moe", **CASES[case])
    assert result.passed, result.table()
    if case == "preemption":
        assert result.num_preemptions > 0
