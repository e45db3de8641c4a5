"""DeepSeek-V3 (DeepseekV3ForCausalLM; Kimi-K2 too): Llama's pre-norm decoder layer and SiLU MLP around multi-head
latent attention (MLA) over a compressed KV cache, and MoE layers with shared experts and group-limited sigmoid
routing. The lm_head, decoder stack and weight loading are the shared ones of models/base.py.

MLA caches per token only the normalised latent c_kv [kv_lora_rank] and the rotary key k_pe [qk_rope_head_dim]
(one "head", see configurations/deepseek.py). kv_b_proj's key half is absorbed into the query and its value
half applied after attention, so attention runs directly on the latent cache:
  score = q_nope . (W_uk c_kv) + q_pe . k_pe = (W_uk^T q_nope) . c_kv + q_pe . k_pe
  out   = W_uv (sum_j p_j c_kv_j)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from lmforge.model_inputs import AttnMetadata
from lmforge.models.base import CausalLM, DecoderModel
from lmforge.models.llama import LlamaDecoderLayer, LlamaMLP
from lmforge.nn import (
    ApplyRotaryEmb,
    Attention,
    RMSNorm,
    build_colwise_linear,
    build_rotary_embedding_from_config,
    build_rowwise_linear,
    rope_parameters,
)
from lmforge.nn.moe import FusedMoE, grouped_topk


def _softmax_scale(config) -> float:
    """qk_head_dim**-0.5, times mscale**2 under yarn scaling with mscale_all_dim (the scores see both q and k)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    p = rope_parameters(config)
    if p["rope_type"] != "default" and p.get("mscale_all_dim") and p.get("factor", 1.0) > 1:
        mscale = 0.1 * p["mscale_all_dim"] * math.log(p["factor"]) + 1.0
        scale *= mscale * mscale
    return scale


class DeepseekV3Attention(nn.Module):
    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        num_heads, bias = config.num_attention_heads, getattr(config, "attention_bias", False)
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_lora_rank = config.v_head_dim, config.kv_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        if config.q_lora_rank is None:
            self.q_proj = build_colwise_linear(config.hidden_size, num_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = build_colwise_linear(config.hidden_size, config.q_lora_rank, bias=bias, is_tp=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, 1e-6)
            self.q_b_proj = build_colwise_linear(config.q_lora_rank, num_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = build_colwise_linear(
            config.hidden_size, self.kv_lora_rank + self.rope_dim, bias=bias, is_tp=False
        )
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, 1e-6)
        self.kv_b_proj = build_colwise_linear(self.kv_lora_rank, num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.rope_interleave = getattr(config, "rope_interleave", True)
        self.apply_rotary_pos_emb = ApplyRotaryEmb()
        self.attn_fwd = Attention(
            num_heads,
            self.kv_lora_rank + self.rope_dim,
            scale=_softmax_scale(config),
            num_kv_heads=1,
            v_head_size=self.kv_lora_rank,
        )
        self.o_proj = build_rowwise_linear(num_heads * self.v_dim, config.hidden_size, bias=bias, is_tp=True)

    def forward(self, hidden_states, rotary_pos_emb, past_key_value, attn_metadata: AttnMetadata) -> torch.Tensor:
        num_tokens = hidden_states.shape[0]
        if hasattr(self, "q_proj"):
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(num_tokens, -1, self.nope_dim + self.rope_dim)  # [T, local heads, qk_dim]
        num_heads = q.shape[1]
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        kv_c, k_pe = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv_c = self.kv_a_layernorm(kv_c)
        k_pe = k_pe.unsqueeze(1)  # [T, 1, rope_dim]
        if self.rope_interleave:  # pairs (x0, x1), (x2, x3) rotate together: regroup as [evens | odds]
            q_pe = torch.cat((q_pe[..., 0::2], q_pe[..., 1::2]), dim=-1)
            k_pe = torch.cat((k_pe[..., 0::2], k_pe[..., 1::2]), dim=-1)
        q_pe, k_pe = self.apply_rotary_pos_emb(q_pe, k_pe, *rotary_pos_emb)
        w_kv = self.kv_b_proj.weight.view(num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w_kv.split([self.nope_dim, self.v_dim], dim=1)
        q_latent = torch.einsum("thn,hnl->thl", q_nope, w_uk)  # [T, heads, kv_lora_rank]
        query = torch.cat((q_latent, q_pe), dim=-1)
        key = torch.cat((kv_c.unsqueeze(1), k_pe), dim=-1)  # [T, 1, kv_lora_rank + rope_dim]: the cached latent
        latent_out = self.attn_fwd(query, key, None, past_key_value[0], past_key_value[1], attn_metadata)
        out = torch.einsum("thl,hvl->thv", latent_out.view(num_tokens, num_heads, self.kv_lora_rank), w_uv)
        return self.o_proj(out.reshape(num_tokens, num_heads * self.v_dim))


class DeepseekV3MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        num_experts = config.n_routed_experts
        # the router runs in float32 (HF keeps it so): near-tied expert scores must pick the same experts
        self.gate = build_rowwise_linear(config.hidden_size, num_experts, bias=False, dtype=torch.float32)
        self.gate.e_score_correction_bias = nn.Parameter(
            torch.zeros(num_experts, dtype=torch.float32, device=self.gate.weight.device), requires_grad=False
        )
        self.experts = FusedMoE(config.hidden_size, config.moe_intermediate_size, num_experts)
        self.shared_experts = LlamaMLP(config, intermediate_size=config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        c = self.config
        topk_weights, topk_ids = grouped_topk(
            self.gate(hidden_states.float()),
            c.num_experts_per_tok,
            c.n_group,
            c.topk_group,
            self.gate.e_score_correction_bias,
            c.norm_topk_prob,
            c.routed_scaling_factor,
        )
        return self.experts(hidden_states, topk_weights, topk_ids) + self.shared_experts(hidden_states)


class DeepseekV3DecoderLayer(LlamaDecoderLayer):
    def build_attention(self, config, layer_idx: int) -> nn.Module:
        return DeepseekV3Attention(config, layer_idx)

    def build_mlp(self, config, layer_idx: int) -> nn.Module:
        is_moe = layer_idx >= config.first_k_dense_replace and layer_idx % getattr(config, "moe_layer_freq", 1) == 0
        return DeepseekV3MoE(config) if is_moe else LlamaMLP(config)


class DeepseekV3ForCausalLM(CausalLM):
    decoder_layer_cls = DeepseekV3DecoderLayer
    packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}
    expert_proj_names = ("gate_proj", "up_proj", "down_proj")

    def build_model(self, config, dtype: torch.dtype) -> nn.Module:
        # the rotary embedding covers only the qk_rope_head_dim channels of each head
        rotary_emb = build_rotary_embedding_from_config(config, head_dim=config.qk_rope_head_dim)
        return DecoderModel(config, self.decoder_layer_cls, rotary_emb=rotary_emb)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # the multi-token-prediction layer (model.layers.<num_hidden_layers>) is not used for generation
        mtp_layer = f"model.layers.{self.config.num_hidden_layers}."
        return super().load_weights((name, tensor) for name, tensor in weights if mtp_layer not in name)
