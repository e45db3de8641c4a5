"""Fused mixture-of-experts in plain torch: every token goes through its top-k experts, each expert a gated MLP
(gate_up_proj -> act(gate) * up -> down_proj), and the outputs are summed with the routing weights."""

from __future__ import annotations

import torch

from .activation import gelu_and_mul, silu_and_mul


def _act_and_mul(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return silu_and_mul(gate_up)
    if activation in ("gelu", "gelu_tanh"):
        return gelu_and_mul(gate_up, approximate="tanh" if activation == "gelu_tanh" else "none")
    raise ValueError(f"unsupported MoE activation {activation!r}; supported: silu, gelu, gelu_tanh")


def fused_moe(
    hidden_states: torch.Tensor,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """hidden_states [T, H], gate_up_weight [E, 2I, H], down_weight [E, H, I], topk_weights/ids [T, k] -> [T, H].

    Each expert's output is multiplied by its routing weight in the weights' dtype (float32 routing weights
    promote, as HF Mixtral does) and accumulated in the hidden dtype. If this reference runs on CUDA tensors
    under graph capture (the cuda backend has its own Triton kernel; this path is for tests and fallbacks), a
    data-dependent loop cannot be recorded, so the dense form runs instead.
    """
    if hidden_states.is_cuda and torch.cuda.is_current_stream_capturing():
        return fused_moe_dense(hidden_states, gate_up_weight, down_weight, topk_weights, topk_ids, activation)
    return fused_moe_grouped(hidden_states, gate_up_weight, down_weight, topk_weights, topk_ids, activation)


def fused_moe_grouped(
    hidden_states: torch.Tensor,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """Tokens grouped by expert; only the experts that got tokens run (reads the counts on the host)."""
    num_experts, top_k = gate_up_weight.shape[0], topk_ids.shape[1]
    out = torch.zeros_like(hidden_states)
    flat_ids = topk_ids.reshape(-1)
    order = flat_ids.argsort(stable=True)  # (token, k) slots grouped by expert
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    token_of_slot = order // top_k
    weight_of_slot = topk_weights.reshape(-1)[order]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tokens = token_of_slot[start : start + n]
        h = _act_and_mul(hidden_states[tokens] @ gate_up_weight[e].t(), activation) @ down_weight[e].t()
        out.index_add_(0, tokens, (h * weight_of_slot[start : start + n, None]).to(out.dtype))
        start += n
    return out


def fused_moe_dense(
    hidden_states: torch.Tensor,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """Every expert on every token, weighted 0 where not routed: no host sync, so it can be graph-captured."""
    num_tokens, num_experts = hidden_states.shape[0], gate_up_weight.shape[0]
    out = torch.zeros_like(hidden_states)
    dense = torch.zeros(num_tokens, num_experts, dtype=topk_weights.dtype, device=hidden_states.device)
    dense.scatter_add_(1, topk_ids.long(), topk_weights)  # [T, E] routing weight of each expert, 0 if not routed
    for e in range(num_experts):
        h = _act_and_mul(hidden_states @ gate_up_weight[e].t(), activation) @ down_weight[e].t()
        out += (h * dense[:, e : e + 1]).to(out.dtype)
    return out
