"""DeepSeek-V3 (DeepseekV3ForCausalLM; Kimi-K2 too): multi-head latent attention (MLA) over a compressed KV
cache, and MoE layers with shared experts and group-limited sigmoid routing.

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

from lmforge.model_inputs import AttnMetadata, StepContext, StepContextManager
from lmforge.nn import (
    ApplyRotaryEmb,
    Attention,
    RMSNorm,
    SiluAndMul,
    build_colwise_linear,
    build_embedding,
    build_merged_colwise_linear,
    build_rotary_embedding_from_config,
    build_rowwise_linear,
    rope_parameters,
)
from lmforge.nn.moe import FusedMoE, grouped_topk, load_expert_weights
from lmforge.weights.loader import load_weights


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


class DeepseekV3MLP(nn.Module):
    def __init__(self, config, intermediate_size: int):
        super().__init__()
        size = intermediate_size
        self.gate_up_proj = build_merged_colwise_linear(config.hidden_size, [size, size], bias=False)
        self.act_fn = SiluAndMul(inplace=True)
        self.down_proj = build_rowwise_linear(size, config.hidden_size, bias=False, is_tp=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


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
        self.shared_experts = DeepseekV3MLP(config, config.moe_intermediate_size * config.n_shared_experts)

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


class DeepseekV3DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = DeepseekV3Attention(config, layer_idx)
        is_moe = layer_idx >= config.first_k_dense_replace and layer_idx % getattr(config, "moe_layer_freq", 1) == 0
        self.mlp = DeepseekV3MoE(config) if is_moe else DeepseekV3MLP(config, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, rotary_pos_emb, past_key_value, residual, attn_metadata):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(hidden_states, rotary_pos_emb, past_key_value, attn_metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class DeepseekV3Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = build_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DeepseekV3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = build_rotary_embedding_from_config(config, head_dim=config.qk_rope_head_dim)

    def forward(self, input_ids, position_ids, past_key_values, attn_metadata, inputs_embeds=None):
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        rotary_pos_emb = self.rotary_emb(position_ids)
        residual = None
        for layer, past_key_value in zip(self.layers, past_key_values, strict=True):
            hidden_states, residual = layer(hidden_states, rotary_pos_emb, past_key_value, residual, attn_metadata)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class DeepseekV3ForCausalLM(nn.Module):
    support_cuda_graph = True
    packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}
    expert_proj_names = ("gate_proj", "up_proj", "down_proj")

    def __init__(
        self, config, ctx_mgr: StepContextManager, dtype: torch.dtype | None = None, device: torch.device | None = None
    ):
        super().__init__()
        self.config, self.ctx_mgr = config, ctx_mgr
        self.model = DeepseekV3Model(config)
        self.lm_head = build_rowwise_linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: list,
        attn_metadata: AttnMetadata | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden]; the engine calls get_logits on the rows it samples from."""
        return self.model(input_ids, position_ids, past_key_values, attn_metadata, inputs_embeds)

    def get_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states).float()

    def prepare_inputs_for_generation(
        self, past_key_values: list, inputs_embeds: torch.Tensor | None = None, context: StepContext | None = None
    ) -> dict:
        return dict(
            input_ids=context.input_ids,
            position_ids=context.position_ids,
            past_key_values=past_key_values,
            attn_metadata=context.attn_metadata,
            inputs_embeds=inputs_embeds,
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # the multi-token-prediction layer (model.layers.<num_hidden_layers>) is not used for generation
        skip = (f"model.layers.{self.config.num_hidden_layers}.",)
        if getattr(self.config, "tie_word_embeddings", False):
            skip += ("lm_head.weight",)
        loaded_experts: set[str] = set()
        weights = load_expert_weights(self, weights, self.expert_proj_names, loaded_experts)
        loaded = load_weights(self, weights, self.packed_modules_mapping, skip)
        return loaded | loaded_experts
