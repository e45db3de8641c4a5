"""Llama (Llama 2/3/3.x, SmolLM2, and every checkpoint with LlamaForCausalLM), built from lmforge.nn ops; the decoder
stack and the top class's contract (lm_head, forward, get_logits, load_weights) are models/base.py's.

The attention, MLP and decoder layer here are also those of the Llama-like families: their options (q/k/v and
o_proj biases, q/k head norms, the attention's scale and soft-capping, the MLP's size and activation) and the
layer's build_attention / build_mlp let Qwen2, Qwen3, Mixtral, Gemma and DeepSeek-V3 write only what differs."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.model_inputs import AttnMetadata
from lmforge.models.base import CausalLM
from lmforge.nn import (
    ApplyRotaryEmb,
    Attention,
    RMSNorm,
    SiluAndMul,
    build_merged_colwise_linear,
    build_qkv_proj,
    build_rowwise_linear,
)
from lmforge.nn.attention import layer_sliding_window


class LlamaAttention(nn.Module):
    """qkv_bias / o_bias default to the config's attention_bias (Qwen2 biases q/k/v only). qk_norm adds an
    RMSNorm over each head of q and k before the rotary embedding (Qwen3, Gemma 3), scaled by (1 + w) under
    norm_weight_offset=1.0. scale and logit_softcapping are options of the Attention op (Gemma 2)."""

    def __init__(
        self,
        config,
        layer_idx: int = 0,
        qkv_bias: bool | None = None,
        o_bias: bool | None = None,
        qk_norm: bool = False,
        norm_weight_offset: float = 0.0,
        scale: float | None = None,
        logit_softcapping: float | None = None,
    ):
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        bias = getattr(config, "attention_bias", False)
        qkv_bias, o_bias = bias if qkv_bias is None else qkv_bias, bias if o_bias is None else o_bias
        self.qkv_proj = build_qkv_proj(config.hidden_size, num_heads, num_kv_heads, head_dim, bias=qkv_bias)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps, weight_offset=norm_weight_offset)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps, weight_offset=norm_weight_offset)
        self.apply_rotary_pos_emb = ApplyRotaryEmb()
        # sliding_window is None for Llama checkpoints; Mistral-style configs and `layer_types` set a window
        self.attn_fwd = Attention(
            num_heads,
            head_dim,
            scale=scale,
            num_kv_heads=num_kv_heads,
            sliding_window=layer_sliding_window(config, layer_idx),
            logit_softcapping=logit_softcapping,
        )
        self.o_proj = build_rowwise_linear(num_heads * head_dim, config.hidden_size, bias=o_bias, is_tp=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary_pos_emb: tuple[torch.Tensor, torch.Tensor],
        past_key_value: tuple[torch.Tensor, torch.Tensor],
        attn_metadata: AttnMetadata,
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj.split_qkv(self.qkv_proj(hidden_states))  # [T, heads, head_dim] each
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.apply_rotary_pos_emb(q, k, *rotary_pos_emb)
        attn_output = self.attn_fwd(q, k, v, past_key_value[0], past_key_value[1], attn_metadata)
        return self.o_proj(attn_output)


class LlamaMLP(nn.Module):
    """down(act(gate) * up). intermediate_size defaults to the config's (DeepSeek's shared experts differ); act_fn
    to SiLU (Gemma passes its GELU)."""

    def __init__(self, config, intermediate_size: int | None = None, act_fn: nn.Module | None = None):
        super().__init__()
        size = config.intermediate_size if intermediate_size is None else intermediate_size
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = build_merged_colwise_linear(config.hidden_size, [size, size], bias=bias)
        self.act_fn = SiluAndMul(inplace=True) if act_fn is None else act_fn
        self.down_proj = build_rowwise_linear(size, config.hidden_size, bias=bias, is_tp=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)). A family with another attention or MLP overrides
    build_attention or build_mlp; norm_weight_offset = 1.0 gives Gemma's (1 + w) norms."""

    norm_weight_offset = 0.0

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = self.build_attention(config, layer_idx)
        self.mlp = self.build_mlp(config, layer_idx)
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(size, eps, weight_offset=self.norm_weight_offset)
        self.post_attention_layernorm = RMSNorm(size, eps, weight_offset=self.norm_weight_offset)

    def build_attention(self, config, layer_idx: int) -> nn.Module:
        return LlamaAttention(config, layer_idx)

    def build_mlp(self, config, layer_idx: int) -> nn.Module:
        return LlamaMLP(config)

    def forward(self, hidden_states, rotary_pos_emb, past_key_value, residual, attn_metadata):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(hidden_states, rotary_pos_emb, past_key_value, attn_metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaForCausalLM(CausalLM):
    decoder_layer_cls = LlamaDecoderLayer
