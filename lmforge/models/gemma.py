"""Gemma (GemmaForCausalLM, the first generation): Llama with RMSNorms that scale by (1 + w), a tanh-GELU gated MLP,
embeddings scaled by sqrt(hidden_size) and, unless the config says otherwise, the lm_head tied to the embeddings."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.models.base import CausalLM, DecoderModel
from lmforge.models.llama import LlamaDecoderLayer, LlamaMLP
from lmforge.nn import GeluAndMul, NormSpec


class GemmaDecoderLayer(LlamaDecoderLayer):
    norm_spec = NormSpec(weight_offset=1.0)

    def build_mlp(self, config, layer_idx: int) -> nn.Module:
        # released Gemma configs say hidden_act="gelu" but were trained with the tanh approximation (HF agrees)
        return LlamaMLP(config, act_fn=GeluAndMul(approximate="tanh"))


class GemmaModel(DecoderModel):
    """The decoder stack (its final norm (1 + w) like the layers') with embeddings scaled by sqrt(hidden_size)."""

    def __init__(self, config, layer_cls, dtype: torch.dtype, rotary_emb: nn.Module | None = None):
        # HF multiplies by sqrt(hidden) rounded to the weights' dtype; round the same way
        embed_scale = float(torch.tensor(config.hidden_size**0.5, dtype=dtype))
        super().__init__(config, layer_cls, rotary_emb=rotary_emb, embed_scale=embed_scale)


class GemmaForCausalLM(CausalLM):
    decoder_layer_cls = GemmaDecoderLayer
    default_tie_word_embeddings = True

    def build_model(self, config, dtype: torch.dtype) -> nn.Module:
        return GemmaModel(config, self.decoder_layer_cls, dtype)
