"""Qwen3 (Qwen3ForCausalLM): Llama with an RMSNorm over each head of q and k (q_norm / k_norm) before the rotary
embedding. Everything else is Llama's, including the attention bias when the config sets attention_bias."""

from __future__ import annotations

from torch import nn

from lmforge.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Qwen3DecoderLayer(LlamaDecoderLayer):
    def build_attention(self, config, layer_idx: int) -> nn.Module:
        return LlamaAttention(config, layer_idx, qk_norm=True)


class Qwen3ForCausalLM(LlamaForCausalLM):
    decoder_layer_cls = Qwen3DecoderLayer
