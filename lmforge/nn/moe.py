"""Mixture of experts: `FusedMoE` holds all experts' weights stacked ([num_experts, ...]) and runs the backend's
fused_moe op; the router helpers turn router logits into (topk_weights, topk_ids) the way each family defines it.
Routing stays in the model file (it differs per family); the expert computation does not.

Under TP every rank keeps all experts with a slice of their intermediate size and the outputs are all-reduced.

Under a quant_config the experts are quantized or dense as their checkpoint tensors decide, as for linear layers
(lmforge/nn/quant/moe.py): per-expert `<prefix>.experts.<e>.<proj>.<tensor>` (qweight, weight_scale_inv, ...).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from lmforge.backends.registry import current_build_context, get_op
from lmforge.nn.linear import default_weight_loader
from lmforge.nn.quant.moe import QuantExpertsMixin

_SHARDS = ("gate", "up", "down")


def softmax_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral / Qwen-MoE routing: softmax over all experts, keep the top k, optionally rescale them to sum 1.
    router_logits [T, E] -> (weights float32 [T, k], ids int64 [T, k])."""
    probs = router_logits.float().softmax(dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def grouped_topk(
    router_logits: torch.Tensor,
    top_k: int,
    num_groups: int,
    topk_groups: int,
    correction_bias: torch.Tensor | None = None,
    renormalize: bool = True,
    scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing: sigmoid scores; experts are picked (with a load-balancing bias added) only from the
    topk_groups groups whose two best biased scores sum highest; the weights are the unbiased scores."""
    scores = router_logits.float().sigmoid()
    biased = scores if correction_bias is None else scores + correction_bias.float()
    num_tokens, num_experts = biased.shape
    by_group = biased.view(num_tokens, num_groups, num_experts // num_groups)
    group_scores = by_group.topk(min(2, by_group.shape[-1]), dim=-1).values.sum(dim=-1)  # [T, groups]
    keep_groups = group_scores.topk(topk_groups, dim=-1).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)
    expert_mask = group_mask[:, :, None].expand_as(by_group).reshape(num_tokens, num_experts)
    ids = biased.masked_fill(~expert_mask, float("-inf")).topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling_factor, ids


class FusedMoE(QuantExpertsMixin, nn.Module):
    """num_experts gated MLPs: gate_up_proj [E, 2 * I, H] ([gate; up] per expert), down_proj [E, H, I].

    The parameter names match HF transformers 5's stacked experts, so such a checkpoint loads as is;
    per-expert checkpoints (the common case) load through `load_expert_weights`."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        activation: str = "silu",
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        is_tp: bool = True,
    ):
        super().__init__()
        ctx = current_build_context()
        dtype, device = dtype or ctx.dtype, device or ctx.device
        self.tp_size, self.tp_rank = (ctx.tp_size, ctx.tp_rank) if is_tp else (1, 0)
        if intermediate_size % self.tp_size:
            raise ValueError(f"moe intermediate size ({intermediate_size}) is not divisible by tp={self.tp_size}")
        self.num_experts, self.activation = num_experts, activation
        self.intermediate_size = intermediate_size // self.tp_size
        size = self.intermediate_size
        self.hidden_size = hidden_size
        self.op = get_op("fused_moe")
        if self.init_quant_experts(dtype, device):
            return
        empty = dict(dtype=dtype, device=device)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * size, hidden_size, **empty), False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, size, **empty), False)
        self.gate_up_proj.weight_loader = self.weight_loader
        self.down_proj.weight_loader = self.weight_loader

    def load_expert_tensor(self, expert: int, shard: str, tensor_name: str, tensor: torch.Tensor) -> str | None:
        """One expert's checkpoint tensor; returns the parameter it went into, None if it is not one of ours."""
        if self.quant_config is not None:
            return self.load_quant_expert_tensor(expert, shard, tensor_name, tensor)
        if tensor_name != "weight":
            return None
        param_name = "down_proj" if shard == "down" else "gate_up_proj"
        self.weight_loader(getattr(self, param_name), tensor, (expert, shard))
        return param_name

    def _local(self, weight: torch.Tensor, dim: int) -> torch.Tensor:
        return weight.chunk(self.tp_size, dim)[self.tp_rank]

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        """shard_id None: the stacked tensor of all experts; else (expert_id, 'gate' | 'up' | 'down') with one
        expert's [out, in] matrix as a checkpoint stores it."""
        size = self.intermediate_size
        if shard_id is None:
            if param is self.down_proj:
                default_weight_loader(param, self._local(loaded_weight, 2))
                return
            gate, up = loaded_weight.chunk(2, dim=1)
            default_weight_loader(param.data[:, :size], self._local(gate, 1))
            default_weight_loader(param.data[:, size:], self._local(up, 1))
            return
        expert, shard = shard_id
        if shard == "down":
            default_weight_loader(param.data[expert], self._local(loaded_weight, 1))
        else:
            offset = 0 if shard == "gate" else size
            default_weight_loader(param.data[expert, offset : offset + size], self._local(loaded_weight, 0))

    def forward(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H], topk_weights / topk_ids [T, k] -> [T, H]."""
        if self.quant_w13 is not None:
            out = self.quant_experts_forward(hidden_states, topk_weights, topk_ids)
        else:
            out = self.op(hidden_states, self.gate_up_proj, self.down_proj, topk_weights, topk_ids, self.activation)
        if self.tp_size > 1:
            dist.all_reduce(out, group=current_build_context().tp_group)
        return out


_EXPERT_NAME = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>[^.]+)\.(?P<tensor>[^.]+)$")


def load_expert_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    proj_names: tuple[str, str, str],
    loaded: set[str],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Load per-expert checkpoint tensors `<prefix>.experts.<e>.<proj>.weight` (and, for quantized experts,
    `.qweight`, `.weight_scale`, ...) into the FusedMoE at `<prefix>.experts` and yield every other tensor, so a
    model chains this into the generic loader.

    proj_names are the checkpoint's names of (gate, up, down): ('w1', 'w3', 'w2') for Mixtral,
    ('gate_proj', 'up_proj', 'down_proj') for Qwen-MoE and DeepSeek. Loaded parameter names go into `loaded`.
    """
    experts = {name: m for name, m in model.named_modules() if isinstance(m, FusedMoE)}
    for name, tensor in weights:
        match = _EXPERT_NAME.match(name)
        moe = experts.get(match["prefix"]) if match else None
        if moe is None or match["proj"] not in proj_names:
            yield name, tensor
            continue
        shard = _SHARDS[proj_names.index(match["proj"])]
        param_name = moe.load_expert_tensor(int(match["expert"]), shard, match["tensor"], tensor)
        if param_name is None:
            yield name, tensor
            continue
        loaded.add(f"{match['prefix']}.{param_name}")
