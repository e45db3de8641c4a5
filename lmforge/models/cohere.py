"""Cohere Command-R (CohereForCausalLM): LayerNorm without bias, attention and a gated SiLU MLP in parallel off one
norm, rotary embeddings over interleaved pairs of channels, optional q/k LayerNorms with a weight per head
(use_qk_norm), logits multiplied by logit_scale, and lm_head tied to the embeddings unless the config says not."""

from __future__ import annotations

from torch import nn

from lmforge.models.base import CausalLM
from lmforge.models.llama import LlamaAttention, LlamaDecoderLayer
from lmforge.nn import NormSpec

COHERE_NORM = NormSpec("layer", "layer_norm_eps", bias=False)


class CohereDecoderLayer(LlamaDecoderLayer):
    norm_spec = COHERE_NORM
    residual_layout = "parallel"

    def build_attention(self, config, layer_idx: int) -> nn.Module:
        qk_norm = "heads" if config.use_qk_norm else False
        return LlamaAttention(config, layer_idx, qk_norm=qk_norm, norm_spec=COHERE_NORM, rope_interleave=True)


class CohereForCausalLM(CausalLM):
    decoder_layer_cls = CohereDecoderLayer
    default_tie_word_embeddings = True

    def __init__(self, config, ctx_mgr, dtype=None, device=None):
        super().__init__(config, ctx_mgr, dtype, device)
        self.logit_scale = config.logit_scale
