"""OLMo 2 (Olmo2ForCausalLM): Llama with the norms after attention and after the MLP instead of before them (the
"post" residual layout: x + norm(attn(x)), then x + norm(mlp(x))), and RMSNorms over the whole projected q and k
(not per head), which under tensor parallelism all-reduce their sum of squares across the ranks."""

from __future__ import annotations

from torch import nn

from lmforge.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Olmo2DecoderLayer(LlamaDecoderLayer):
    residual_layout = "post"

    def build_attention(self, config, layer_idx: int) -> nn.Module:
        return LlamaAttention(config, layer_idx, qk_norm="full")


class Olmo2ForCausalLM(LlamaForCausalLM):
    decoder_layer_cls = Olmo2DecoderLayer
