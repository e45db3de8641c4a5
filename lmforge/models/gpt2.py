"""GPT-2 (GPT2LMHeadModel): pre-norm LayerNorm layers with learned absolute position embeddings instead of rotary,
q/k/v fused in one `c_attn` ([q; k; v], multi-head), a plain GELU MLP, biases everywhere, lm_head tied to the
embeddings. Checkpoints store Conv1D weights ([in, out], transposed against nn.Linear) under GPT-2's own names,
which load_weights transposes and renames."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lmforge.models.base import CausalLM, DecoderModel
from lmforge.models.llama import LlamaAttention, LlamaDecoderLayer, PlainMLP
from lmforge.nn import NormSpec, build_act, build_embedding

_CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")


class GPT2DecoderLayer(LlamaDecoderLayer):
    norm_spec = NormSpec("layer", "layer_norm_epsilon")

    def build_attention(self, config, layer_idx: int) -> nn.Module:
        if getattr(config, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention (add_cross_attention) is an encoder-decoder, not supported")
        head_dim = config.hidden_size // config.num_attention_heads
        scale = head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        return LlamaAttention(config, layer_idx, qkv_bias=True, o_bias=True, scale=scale)

    def build_mlp(self, config, layer_idx: int) -> nn.Module:
        return PlainMLP(config, build_act(config.activation_function), config.n_inner or 4 * config.hidden_size)


class GPT2Model(DecoderModel):
    """The decoder stack without rotary embeddings: token plus learned position embeddings."""

    def __init__(self, config, layer_cls):
        super().__init__(config, layer_cls, use_rotary=False)
        self.embed_positions = build_embedding(config.n_positions, config.hidden_size)

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) + self.embed_positions(position_ids)


class GPT2LMHeadModel(CausalLM):
    decoder_layer_cls = GPT2DecoderLayer
    default_tie_word_embeddings = True
    checkpoint_renames = (
        (".transformer.", ".model."),
        (".wte.", ".embed_tokens."),
        (".wpe.", ".embed_positions."),
        (".h.", ".layers."),
        (".ln_1.", ".input_layernorm."),
        (".ln_2.", ".post_attention_layernorm."),
        (".attn.c_attn.", ".self_attn.qkv_proj."),
        (".attn.c_proj.", ".self_attn.o_proj."),
        (".mlp.c_fc.", ".mlp.fc1."),
        (".mlp.c_proj.", ".mlp.fc2."),
        (".ln_f.", ".norm."),
    )

    def build_model(self, config, dtype: torch.dtype) -> nn.Module:
        return GPT2Model(config, self.decoder_layer_cls)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # Conv1D stores [in, out]; old checkpoints also carry the causal-mask buffers attn.bias / attn.masked_bias
        weights = (
            (name, tensor.t() if name.endswith(_CONV1D) else tensor)
            for name, tensor in weights
            if not name.endswith((".attn.bias", ".attn.masked_bias"))
        )
        return super().load_weights(weights)
