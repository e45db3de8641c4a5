"""Gemma 2 (Gemma2ForCausalLM): Gemma with a norm before and after both attention and MLP (the "sandwich" residual
layout), sliding-window attention on the layers `layer_types` marks, soft-capped attention scores and final logits,
queries scaled by query_pre_attn_scalar**-0.5, and exact GELU when hidden_activation is "gelu". Windows and capping
are options of the Attention op."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.models.gemma import GemmaDecoderLayer, GemmaForCausalLM
from lmforge.models.llama import LlamaAttention, LlamaMLP
from lmforge.nn import GeluAndMul


class Gemma2DecoderLayer(GemmaDecoderLayer):
    """Also Gemma 3's layer, which sets qk_norm."""

    residual_layout = "sandwich"
    qk_norm = False

    def build_attention(self, config, layer_idx: int) -> nn.Module:
        return LlamaAttention(
            config,
            layer_idx,
            qk_norm=self.qk_norm,
            norm_weight_offset=1.0,
            scale=config.query_pre_attn_scalar**-0.5,
            logit_softcapping=getattr(config, "attn_logit_softcapping", None),
        )

    def build_mlp(self, config, layer_idx: int) -> nn.Module:
        exact = getattr(config, "hidden_activation", None) == "gelu"
        return LlamaMLP(config, act_fn=GeluAndMul(approximate="none" if exact else "tanh"))


class Gemma2ForCausalLM(GemmaForCausalLM):
    decoder_layer_cls = Gemma2DecoderLayer

    def get_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden_states).float()
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits
