"""Gemma 3 text (Gemma3ForCausalLM, and the language model of Gemma 3 checkpoints): Gemma 2's layout with an
RMSNorm over each head of q and k, and local (sliding-window) and global layers that each have their own rotary
base and scaling (`rope_parameters[layer_type]`). Soft-capping stays available but is off in released configs."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lmforge.model_inputs import AttnMetadata, StepContext, StepContextManager
from lmforge.nn import (
    ApplyRotaryEmb,
    Attention,
    GeluAndMul,
    RMSNorm,
    build_embedding,
    build_merged_colwise_linear,
    build_qkv_proj,
    build_rotary_embedding_from_config,
    build_rowwise_linear,
    rope_parameters,
)
from lmforge.nn.attention import layer_sliding_window
from lmforge.weights.loader import load_weights


def _rope_params(config, layer_type: str) -> dict:
    """transformers 5 keeps one rope dict per layer type; transformers 4 configs have the global rope at the top
    level and only the base (rope_local_base_freq) of the local layers."""
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params.get(layer_type), dict):
        return params[layer_type]
    if layer_type == "sliding_attention":
        return {"rope_type": "default", "rope_theta": getattr(config, "rope_local_base_freq", 10000.0)}
    return rope_parameters(config)


class Gemma3Attention(nn.Module):
    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        head_dim = config.head_dim
        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = build_qkv_proj(config.hidden_size, num_heads, num_kv_heads, head_dim, bias=bias)
        self.q_norm = RMSNorm(head_dim, config.rms_norm_eps, weight_offset=1.0)
        self.k_norm = RMSNorm(head_dim, config.rms_norm_eps, weight_offset=1.0)
        self.apply_rotary_pos_emb = ApplyRotaryEmb()
        self.attn_fwd = Attention(
            num_heads,
            head_dim,
            scale=config.query_pre_attn_scalar**-0.5,
            num_kv_heads=num_kv_heads,
            sliding_window=layer_sliding_window(config, layer_idx),
            logit_softcapping=getattr(config, "attn_logit_softcapping", None),
        )
        self.o_proj = build_rowwise_linear(num_heads * head_dim, config.hidden_size, bias=bias, is_tp=True)

    def forward(self, hidden_states, rotary_pos_emb, past_key_value, attn_metadata: AttnMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj.split_qkv(self.qkv_proj(hidden_states))  # [T, heads, head_dim] each
        q, k = self.apply_rotary_pos_emb(self.q_norm(q), self.k_norm(k), *rotary_pos_emb)
        return self.o_proj(self.attn_fwd(q, k, v, past_key_value[0], past_key_value[1], attn_metadata))


class Gemma3MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = build_merged_colwise_linear(config.hidden_size, [size, size], bias=False)
        exact = getattr(config, "hidden_activation", None) == "gelu"
        self.act_fn = GeluAndMul(approximate="none" if exact else "tanh")
        self.down_proj = build_rowwise_linear(size, config.hidden_size, bias=False, is_tp=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.is_sliding = layer_sliding_window(config, layer_idx) is not None
        self.self_attn = Gemma3Attention(config, layer_idx)
        self.mlp = Gemma3MLP(config)
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(size, eps, weight_offset=1.0)
        self.post_attention_layernorm = RMSNorm(size, eps, weight_offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(size, eps, weight_offset=1.0)
        self.post_feedforward_layernorm = RMSNorm(size, eps, weight_offset=1.0)

    def forward(self, hidden_states, rotary_pos_emb, past_key_value, residual, attn_metadata):
        """rotary_pos_emb: {True: local (cos, sin), False: global (cos, sin)}; the layer takes its own."""
        rotary_pos_emb = rotary_pos_emb[self.is_sliding]
        # residual carries the stream; each norm with a residual argument adds it first (fused residual add)
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(hidden_states, rotary_pos_emb, past_key_value, attn_metadata)
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
        hidden_states = self.post_feedforward_layernorm(self.mlp(hidden_states))
        return hidden_states, residual


class Gemma3Model(nn.Module):
    def __init__(self, config, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = build_embedding(config.vocab_size, config.hidden_size)
        # HF multiplies by sqrt(hidden) rounded to the weights' dtype; round the same way
        self.embed_scale = float(torch.tensor(config.hidden_size**0.5, dtype=dtype))
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, weight_offset=1.0)
        self.rotary_emb = build_rotary_embedding_from_config(config, params=_rope_params(config, "full_attention"))
        self.rotary_emb_local = build_rotary_embedding_from_config(
            config, params=_rope_params(config, "sliding_attention")
        )

    def forward(self, input_ids, position_ids, past_key_values, attn_metadata, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids) * self.embed_scale
        hidden_states = inputs_embeds
        rotary_pos_emb = {False: self.rotary_emb(position_ids), True: self.rotary_emb_local(position_ids)}
        residual = None
        for layer, past_key_value in zip(self.layers, past_key_values, strict=True):
            hidden_states, residual = layer(hidden_states, rotary_pos_emb, past_key_value, residual, attn_metadata)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class Gemma3ForCausalLM(nn.Module):
    support_cuda_graph = True
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(
        self, config, ctx_mgr: StepContextManager, dtype: torch.dtype | None = None, device: torch.device | None = None
    ):
        super().__init__()
        self.config, self.ctx_mgr = config, ctx_mgr
        self.model = Gemma3Model(config, dtype or torch.get_default_dtype())
        self.lm_head = build_rowwise_linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", True):
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
        logits = self.lm_head(hidden_states).float()
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

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
        skip = ("lm_head.weight",) if getattr(self.config, "tie_word_embeddings", True) else ()
        return load_weights(self, weights, self.packed_modules_mapping, skip)
