"""Phi-1/1.5/2 (PhiForCausalLM): LayerNorm with bias, attention and a plain GELU MLP in parallel off one norm, rotary
over part of each head (partial_rotary_factor, from the config through the rotary builder), biases on every
projection and on lm_head, and optional per-head q/k LayerNorms (qk_layernorm)."""

from __future__ import annotations

from torch import nn

from lmforge.models.base import CausalLM
from lmforge.models.llama import LlamaAttention, LlamaDecoderLayer, PlainMLP
from lmforge.nn import LAYER_NORM, build_act


class PhiDecoderLayer(LlamaDecoderLayer):
    norm_spec = LAYER_NORM
    residual_layout = "parallel"

    def build_attention(self, config, layer_idx: int) -> nn.Module:
        qk_norm = "head" if config.qk_layernorm else False
        return LlamaAttention(config, layer_idx, qkv_bias=True, o_bias=True, qk_norm=qk_norm, norm_spec=LAYER_NORM)

    def build_mlp(self, config, layer_idx: int) -> nn.Module:
        return PlainMLP(config, build_act(config.hidden_act))


class PhiForCausalLM(CausalLM):
    decoder_layer_cls = PhiDecoderLayer
    lm_head_bias = True
    checkpoint_renames = (
        (".self_attn.dense.", ".self_attn.o_proj."),
        (".q_layernorm.", ".q_norm."),
        (".k_layernorm.", ".k_norm."),
        (".final_layernorm.", ".norm."),
    )
