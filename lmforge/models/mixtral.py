"""Mixtral (MixtralForCausalLM): Mistral (Llama with a sliding window) with a sparse MoE block instead of the MLP.
A replicated router picks the top-k experts per token (softmax, then the k weights renormalised to sum 1); the
experts run in one FusedMoE op. Checkpoints store each expert as w1 (gate), w3 (up), w2 (down)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lmforge.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from lmforge.nn import build_rowwise_linear
from lmforge.nn.moe import FusedMoE, softmax_topk


class MixtralSparseMoeBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = build_rowwise_linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = FusedMoE(config.hidden_size, config.intermediate_size, config.num_local_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = softmax_topk(self.gate(hidden_states), self.top_k, renormalize=True)
        return self.experts(hidden_states, topk_weights, topk_ids)


class MixtralDecoderLayer(LlamaDecoderLayer):
    def build_mlp(self, config, layer_idx: int) -> nn.Module:
        return MixtralSparseMoeBlock(config)


class MixtralForCausalLM(LlamaForCausalLM):
    decoder_layer_cls = MixtralDecoderLayer
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    expert_proj_names = ("w1", "w3", "w2")  # checkpoint names of each expert's gate, up and down projections

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # checkpoints (and GGUF's names) call the MoE block block_sparse_moe; we call it mlp, as transformers 5 does
        weights = ((name.replace(".block_sparse_moe.", ".mlp.", 1), tensor) for name, tensor in weights)
        return super().load_weights(weights)
