"""Fused MoE on the Triton kernels; same signature as lmforge.backends.cpu.moe.fused_moe."""

import torch

from lmforge.kernels.cuda.fused_moe import fused_moe as fused_moe_kernel


def fused_moe(
    hidden_states: torch.Tensor,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """hidden_states [T, H], gate_up_weight [E, 2I, H], down_weight [E, H, I], topk_weights/ids [T, k] -> [T, H].
    No host sync, so a decode step that routes through it can be captured in a CUDA graph."""
    return fused_moe_kernel(hidden_states, gate_up_weight, down_weight, topk_weights, topk_ids, activation)
