"""Every family in bfloat16 on the CUDA backend (Triton kernels, CUDA graphs for decode) against HF transformers
in bfloat16 on the same GPU, on the tiny random configs of the CPU parity tests.

Stated tolerances: bf16 keeps 8 bits of mantissa, so two correct implementations that round in a different
order drift apart by a few bf16 ulps of the logits (|logits| < 4 here, ulp 2**-6; measured on an H100: at most
0.016 for the dense families): max |logit diff| <= 0.05 over prefill and every decode step (HF's reference logits
are computed on lmforge's own tokens, so this covers every step). MoE families get 0.25: a router near-tie that
bf16 rounding flips sends a token to another expert (measured 0.08). Greedy tokens must agree for the first 3
steps of every sequence, except where HF itself sees a near-tie: a divergence whose HF logit margin between the
two tokens is below 0.05 (tiny random models have many; measured margins of 0 to 0.012).
"""

from __future__ import annotations

import pytest
import torch

from lmforge.check_env.parity import PREEMPTION, run_parity

pytestmark = pytest.mark.gpu

FAMILIES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "mixtral",
    "qwen3_moe",
    "deepseek_v3",
    "phi",
    "cohere",
    "gpt2",
    "granite",
    "stablelm",
    "olmo2",
]
MOE_FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3")
BF16_LOGIT_TOL, BF16_MOE_LOGIT_TOL = 0.05, 0.25
NEAR_TIE = 0.05
EQUAL_STEPS = 3


@pytest.mark.parametrize("case", ["batch", "preemption"])
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_cuda_parity(family, case):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _check_parity(family, case, {"max_batch_size": 8})


@pytest.mark.parametrize("case", ["batch", "preemption"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe", "gemma2", "deepseek_v3", "cohere", "olmo2"])
def test_bf16_cuda_tp2_parity(family, case):
    """Tensor parallelism over two GPUs (NCCL): each rank holds half of every sharded weight and of the KV heads
    (Cohere: per-head q/k norm weights; OLMo 2: full-width q/k norms that all-reduce their sum of squares)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    _check_parity(family, case, {"max_batch_size": 8, "tp": 2})


def _check_parity(family: str, case: str, engine_config: dict) -> None:
    kwargs = PREEMPTION if case == "preemption" else {}
    tolerance = BF16_MOE_LOGIT_TOL if family in MOE_FAMILIES else BF16_LOGIT_TOL
    result = run_parity(
        family, device_type="cuda", dtype="bfloat16", tolerance=tolerance, engine_config=engine_config, **kwargs
    )
    assert result.max_abs_diff <= tolerance, result.table()
    for engine_tokens, hf_tokens, margin in zip(
        result.engine_tokens, result.hf_tokens, result.divergence_margins, strict=True
    ):
        near_tie = margin is not None and margin < NEAR_TIE
        assert engine_tokens[:EQUAL_STEPS] == hf_tokens[:EQUAL_STEPS] or near_tie, result.table()
    if case == "preemption":
        assert result.num_preemptions > 0
