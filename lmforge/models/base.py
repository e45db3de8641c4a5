"""The scaffolding every built-in model shares: `DecoderModel`, the decoder stack (embeddings, decoder layers,
final norm, one rotary embedding per step), and `CausalLM`, the top class the engine builds (lm_head, tied
embeddings, and the forward / get_logits / prepare_inputs_for_generation / load_weights contract). A model file
defines its decoder layer and a CausalLM subclass that names it (see docs/adding_a_model.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from lmforge.model_inputs import AttnMetadata, StepContext, StepContextManager
from lmforge.nn import (
    LLAMA_NORM,
    NormSpec,
    build_embedding,
    build_norm,
    build_rotary_embedding_from_config,
    build_rowwise_linear,
)
from lmforge.nn.moe import load_expert_weights
from lmforge.weights.loader import load_weights


class DecoderModel(nn.Module):
    """HF's `model`: embed_tokens, layers, norm. Each layer is `layer_cls(config, layer_idx)`.

    The residual contract: a layer maps (hidden_states, rotary_pos_emb, past_key_value, residual, attn_metadata)
    -> (hidden_states, residual), where the residual stream's value is hidden_states + residual (the first layer
    gets residual None: the stream is hidden_states). Returning the two unsummed lets the next norm fuse the add;
    the final norm adds the last layer's pair. A layer that needs the sum itself adds it (post-norm layouts).

    The final norm is built from the layer class's `norm_spec` (RMSNorm unless the family says otherwise).
    rotary_emb replaces the config's rotary embedding (DeepSeek's covers only the rope part of each head, Gemma 3
    has two); use_rotary=False builds none (GPT-2's learned positions); embed_scale multiplies the embeddings
    (Gemma's sqrt(hidden_size), Granite's embedding_multiplier)."""

    def __init__(
        self,
        config,
        layer_cls: Callable[[object, int], nn.Module],
        rotary_emb: nn.Module | None = None,
        use_rotary: bool = True,
        embed_scale: float = 1.0,
        norm_spec: NormSpec | None = None,
    ):
        super().__init__()
        self.embed_tokens = build_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(build_layer(layer_cls, config, i) for i in range(config.num_hidden_layers))
        self.norm = build_norm(norm_spec or getattr(layer_cls, "norm_spec", LLAMA_NORM), config, config.hidden_size)
        if use_rotary:
            self.rotary_emb = build_rotary_embedding_from_config(config) if rotary_emb is None else rotary_emb
        else:
            self.rotary_emb = None
        self.embed_scale = embed_scale

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        return hidden_states * self.embed_scale if self.embed_scale != 1.0 else hidden_states

    def forward(self, input_ids, position_ids, past_key_values, attn_metadata, inputs_embeds=None) -> torch.Tensor:
        hidden_states = self.embed(input_ids, position_ids) if inputs_embeds is None else inputs_embeds
        rotary_pos_emb = self.rotary_emb(position_ids) if self.rotary_emb is not None else None
        residual = None
        for layer, past_key_value in zip(self.layers, past_key_values, strict=True):
            hidden_states, residual = layer(hidden_states, rotary_pos_emb, past_key_value, residual, attn_metadata)
        if residual is None:
            return self.norm(hidden_states)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


def build_layer(layer_cls: Callable[[object, int], nn.Module], config, layer_idx: int) -> nn.Module:
    """layer_cls(config, layer_idx); a build error (a size that does not split over the TP ranks) names the layer."""
    try:
        return layer_cls(config, layer_idx)
    except ValueError as e:
        raise ValueError(f"cannot build model.layers.{layer_idx} ({layer_cls.__name__}): {e}") from e


class CausalLM(nn.Module):
    """The top class of a built-in model: `model` (a DecoderModel of `decoder_layer_cls` layers) and `lm_head`.

    A subclass sets `decoder_layer_cls`, and `packed_modules_mapping`, `expert_proj_names` or
    `checkpoint_renames` when its checkpoint names differ; it overrides `build_model` only when the decoder stack
    itself differs (Gemma scales its embeddings). get_logits multiplies by `logit_scale` (Cohere, Granite)."""

    support_cuda_graph = True
    # checkpoint tensors that are parts of one of our merged parameters: q_proj, k_proj, v_proj are qkv_proj's
    # shards 0, 1, 2. A checkpoint that stores the merged matrix (Phi-3) loads it whole, without the mapping.
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    # MoE models: the checkpoint names of each expert's (gate, up, down) projections, loaded into FusedMoE
    expert_proj_names: tuple[str, str, str] | None = None
    # whether lm_head shares the embedding matrix when the config does not say (Gemma: it does)
    default_tie_word_embeddings = False
    # (old, new) substrings of checkpoint names, replaced in order before loading, for checkpoints whose names
    # are not HF-Llama's (GPT-2's transformer.h.N.attn.c_attn is our model.layers.N.self_attn.qkv_proj)
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    lm_head_bias = False
    decoder_layer_cls: Callable[[object, int], nn.Module]

    def __init__(
        self, config, ctx_mgr: StepContextManager, dtype: torch.dtype | None = None, device: torch.device | None = None
    ):
        super().__init__()
        self.config, self.ctx_mgr = config, ctx_mgr
        self.model = self.build_model(config, dtype or torch.get_default_dtype())
        self.lm_head = build_rowwise_linear(config.hidden_size, config.vocab_size, bias=self.lm_head_bias)
        self.logit_scale = 1.0
        self.tie_word_embeddings = getattr(config, "tie_word_embeddings", self.default_tie_word_embeddings)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def build_model(self, config, dtype: torch.dtype) -> nn.Module:
        return DecoderModel(config, self.decoder_layer_cls)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: list,
        attn_metadata: AttnMetadata | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden]; the engine calls get_logits on the rows it samples from."""
        return self.model(input_ids, position_ids, past_key_values, attn_metadata, inputs_embeds)

    def get_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden_states).float()
        return logits * self.logit_scale if self.logit_scale != 1.0 else logits

    def prepare_inputs_for_generation(
        self, past_key_values: list, inputs_embeds: torch.Tensor | None = None, context: StepContext | None = None
    ) -> dict:
        return dict(
            input_ids=context.input_ids,
            position_ids=context.position_ids,
            past_key_values=past_key_values,
            attn_metadata=context.attn_metadata,
            inputs_embeds=inputs_embeds,
        )

    def rename(self, name: str) -> str:
        """A checkpoint name under our module names (`checkpoint_renames`)."""
        if not self.checkpoint_renames:
            return name
        name = f".{name}"
        for old, new in self.checkpoint_renames:
            name = name.replace(old, new)
        return name[1:]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self.checkpoint_renames:
            weights = ((self.rename(name), tensor) for name, tensor in weights)
        skip = ("lm_head.weight",) if self.tie_word_embeddings else ()
        loaded_experts: set[str] = set()
        if self.expert_proj_names is not None:
            # experts first: their gate_proj/up_proj would otherwise match the dense gate_up_proj packing
            weights = load_expert_weights(self, weights, self.expert_proj_names, loaded_experts)
        loaded = load_weights(self, weights, self.packed_modules_mapping, skip)
        return loaded | loaded_experts
