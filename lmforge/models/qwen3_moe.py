"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3 (Llama with q/k head norms) with a sparse MoE block instead of the MLP on
every `decoder_sparse_step`-th layer not listed in `mlp_only_layers`. The router takes the softmax top-k and
renormalises the k weights only when norm_topk_prob is set; the experts run in one FusedMoE op."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM
from lmforge.nn import build_rowwise_linear
from lmforge.nn.moe import FusedMoE, softmax_topk


class Qwen3MoeSparseMoeBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = build_rowwise_linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = FusedMoE(config.hidden_size, config.moe_intermediate_size, config.num_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = softmax_topk(self.gate(hidden_states), self.top_k, self.norm_topk_prob)
        return self.experts(hidden_states, topk_weights.to(hidden_states.dtype), topk_ids)


def _is_moe_layer(config, layer_idx: int) -> bool:
    return (
        layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
        and config.num_experts > 0
        and (layer_idx + 1) % config.decoder_sparse_step == 0
    )


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):
    def build_mlp(self, config, layer_idx: int) -> nn.Module:
        if _is_moe_layer(config, layer_idx):
            return Qwen3MoeSparseMoeBlock(config)
        return super().build_mlp(config, layer_idx)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    decoder_layer_cls = Qwen3MoeDecoderLayer
    expert_proj_names = ("gate_proj", "up_proj", "down_proj")
