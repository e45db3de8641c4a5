"""Llama (Llama 2/3/3.x, SmolLM2, and every checkpoint with LlamaForCausalLM), built from lmforge.nn ops."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lmforge.model_inputs import AttnMetadata, StepContext, StepContextManager
from lmforge.nn import (
    ApplyRotaryEmb,
    Attention,
    RMSNorm,
    SiluAndMul,
    build_embedding,
    build_merged_colwise_linear,
    build_qkv_proj,
    build_rotary_embedding_from_config,
    build_rowwise_linear,
)
from lmforge.nn.attention import layer_sliding_window
from lmforge.weights.loader import load_weights


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        head_dim = _head_dim(config)
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = build_qkv_proj(
            config.hidden_size, config.num_attention_heads, config.num_key_value_heads, head_dim, bias=bias
        )
        self.apply_rotary_pos_emb = ApplyRotaryEmb()
        # None for Llama checkpoints; Mistral-style configs set a window (an option of the Attention op)
        self.attn_fwd = Attention(
            config.num_attention_heads,
            head_dim,
            num_kv_heads=config.num_key_value_heads,
            sliding_window=layer_sliding_window(config, layer_idx),
        )
        self.o_proj = build_rowwise_linear(
            config.num_attention_heads * head_dim, config.hidden_size, bias=bias, is_tp=True
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary_pos_emb: tuple[torch.Tensor, torch.Tensor],
        past_key_value: tuple[torch.Tensor, torch.Tensor],
        attn_metadata: AttnMetadata,
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj.split_qkv(self.qkv_proj(hidden_states))  # [T, heads, head_dim] each
        q, k = self.apply_rotary_pos_emb(q, k, *rotary_pos_emb)
        attn_output = self.attn_fwd(q, k, v, past_key_value[0], past_key_value[1], attn_metadata)
        return self.o_proj(attn_output)


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = build_merged_colwise_linear(
            config.hidden_size, [config.intermediate_size, config.intermediate_size], bias=bias
        )
        self.act_fn = SiluAndMul(inplace=True)
        self.down_proj = build_rowwise_linear(config.intermediate_size, config.hidden_size, bias=bias, is_tp=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
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


class LlamaModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = build_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = build_rotary_embedding_from_config(config)

    def forward(self, input_ids, position_ids, past_key_values, attn_metadata, inputs_embeds=None):
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        rotary_pos_emb = self.rotary_emb(position_ids)
        residual = None
        for layer, past_key_value in zip(self.layers, past_key_values, strict=True):
            hidden_states, residual = layer(hidden_states, rotary_pos_emb, past_key_value, residual, attn_metadata)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    support_cuda_graph = True
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(
        self, config, ctx_mgr: StepContextManager, dtype: torch.dtype | None = None, device: torch.device | None = None
    ):
        super().__init__()
        self.config, self.ctx_mgr = config, ctx_mgr
        self.model = LlamaModel(config)
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
        skip = ("lm_head.weight",) if getattr(self.config, "tie_word_embeddings", False) else ()
        return load_weights(self, weights, self.packed_modules_mapping, skip)
