"""DeepSeek-V3 parity with HF transformers on tiny random configs (fp32, CPU backend, tolerance 1e-4): MLA over one
latent cache per layer, shared + routed experts, group-limited routing. Each case runs a batch of prompts of
different lengths through the engine; the preemption case also prefills in 8-token chunks and runs out of KV blocks,
so sequences are preempted and recomputed."""

from __future__ import annotations

import pytest

from lmforge.check_env.parity import PREEMPTION, run_parity

CASES = {
    "batch": {},
    "preemption": PREEMPTION,
    "yarn_no_q_lora_no_interleave": dict(
        overrides=dict(
            q_lora_rank=None,
            rope_interleave=False,
            norm_topk_prob=False,
            max_position_embeddings=256,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                original_max_position_embeddings=64,
                beta_fast=32,
                beta_slow=1,
                mscale=1.0,
                mscale_all_dim=1.0,
            ),
        )
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_deepseek_v3_parity(case):
    result = run_parity("deepseek_v3", **CASES[case])
    assert result.passed, result.table()
    if case == "preemption":
        assert result.num_preemptions > 0
