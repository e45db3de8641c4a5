"""Qwen2 and Qwen2.5 (Qwen2ForCausalLM): Llama with a bias on the q/k/v projections (not on o_proj). Sliding-window
attention on the layers that `layer_types` marks as sliding, when the config asks for it, is Llama's too."""

from __future__ import annotations

from torch import nn

from lmforge.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Qwen2DecoderLayer(LlamaDecoderLayer):
    def build_attention(self, config, layer_idx: int) -> nn.Module:
        return LlamaAttention(config, layer_idx, qkv_bias=True, o_bias=False)


class Qwen2ForCausalLM(LlamaForCausalLM):
    decoder_layer_cls = Qwen2DecoderLayer
