"""IBM Granite 3.x (GraniteForCausalLM): Llama with four multipliers from the config: embeddings times
embedding_multiplier, what attention and the MLP add to the residual stream times residual_multiplier, attention
scores times attention_multiplier (instead of head_dim**-0.5), and logits divided by logits_scaling."""

from __future__ import annotations

from torch import nn

from lmforge.models.base import CausalLM, DecoderModel
from lmforge.models.llama import LlamaAttention, LlamaDecoderLayer


class GraniteDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.residual_multiplier = config.residual_multiplier

    def build_attention(self, config, layer_idx: int) -> nn.Module:
        return LlamaAttention(config, layer_idx, scale=config.attention_multiplier)


class GraniteForCausalLM(CausalLM):
    decoder_layer_cls = GraniteDecoderLayer

    def __init__(self, config, ctx_mgr, dtype=None, device=None):
        super().__init__(config, ctx_mgr, dtype, device)
        self.logit_scale = 1.0 / config.logits_scaling

    def build_model(self, config, dtype) -> nn.Module:
        return DecoderModel(config, self.decoder_layer_cls, embed_scale=config.embedding_multiplier)
