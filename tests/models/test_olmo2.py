"""OLMo 2 (Olmo2ForCausalLM) parity with HF transformers on tiny random configs (fp32, CPU backend, tolerance 1e-4):
the post-norm residual layout and RMSNorms over the full projected q and k. Under tp=2 each rank holds half of q and
k, so those norms all-reduce their sum of squares; tp=4 would replicate the 2 KV heads, which such a norm cannot
span, and is refused when the model is built, naming the layer."""

from __future__ import annotations

import pytest

from lmforge.check_env.parity import PREEMPTION, run_parity, tiny_hf_config

CASES = {
    "batch": {},
    "preemption": PREEMPTION,
    "tp2_preemption": dict(engine_config={"tp": 2}, **PREEMPTION),
}


@pytest.mark.parametrize("case", list(CASES))
def test_olmo2_parity(case):
    result = run_parity("olmo2", **CASES[case])
    assert result.passed, result.table()
    if "preemption" in case:
        assert result.num_preemptions > 0


def test_full_width_k_norm_over_replicated_kv_heads_fails_at_build_time():
    from lmforge.backends.registry import BuildContext, build_context
    from lmforge.models.olmo2 import Olmo2ForCausalLM

    config = tiny_hf_config("olmo2")  # 4 heads, 2 KV heads
    with build_context(BuildContext(tp_size=4, tp_rank=1)):
        with pytest.raises(ValueError, match=r"model\.layers\.0 \(Olmo2DecoderLayer\).*k norm over the full width"):
            Olmo2ForCausalLM(config, None)
