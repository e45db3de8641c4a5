"""Gemma 3 text (Gemma3ForCausalLM, and the language model of Gemma 3 checkpoints): Gemma 2's decoder layer with an
RMSNorm over each head of q and k, and local (sliding-window) and global layers that each have their own rotary
base and scaling (`rope_parameters[layer_type]`). Soft-capping stays available but is off in released configs."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.models.gemma import GemmaModel
from lmforge.models.gemma2 import Gemma2DecoderLayer, Gemma2ForCausalLM
from lmforge.nn import build_rotary_embedding_from_config, rope_parameters
from lmforge.nn.attention import layer_sliding_window


def _rope_params(config, layer_type: str) -> dict:
    """transformers 5 keeps one rope dict per layer type; transformers 4 configs have the global rope at the top
    level and only the base (rope_local_base_freq) of the local layers."""
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params.get(layer_type), dict):
        return params[layer_type]
    if layer_type == "sliding_attention":
        return {"rope_type": "default", "rope_theta": getattr(config, "rope_local_base_freq", 10000.0)}
    return rope_parameters(config)


class Gemma3RotaryEmbedding(nn.Module):
    """position_ids -> {False: global (cos, sin), True: local (cos, sin)}, keyed by a layer's is_sliding."""

    def __init__(self, config):
        super().__init__()
        self.rotary_emb = build_rotary_embedding_from_config(config, params=_rope_params(config, "full_attention"))
        self.rotary_emb_local = build_rotary_embedding_from_config(
            config, params=_rope_params(config, "sliding_attention")
        )

    def forward(self, position_ids: torch.Tensor) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
        return {False: self.rotary_emb(position_ids), True: self.rotary_emb_local(position_ids)}


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    qk_norm = True

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.is_sliding = layer_sliding_window(config, layer_idx) is not None

    def forward(self, hidden_states, rotary_pos_emb, past_key_value, residual, attn_metadata):
        """rotary_pos_emb: {True: local (cos, sin), False: global (cos, sin)}; the layer takes its own."""
        rotary_pos_emb = rotary_pos_emb[self.is_sliding]
        return super().forward(hidden_states, rotary_pos_emb, past_key_value, residual, attn_metadata)


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    decoder_layer_cls = Gemma3DecoderLayer

    def build_model(self, config, dtype: torch.dtype) -> nn.Module:
        return GemmaModel(config, self.decoder_layer_cls, dtype, rotary_emb=Gemma3RotaryEmbedding(config))
