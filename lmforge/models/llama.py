"""Llama (Llama 2/3/3.x, SmolLM2, and every checkpoint with LlamaForCausalLM), built from lmforge.nn ops; the decoder
stack and the top class's contract (lm_head, forward, get_logits, load_weights) are models/base.py's.

The attention, MLPs and decoder layer here are the scaffold of the other dense families: the attention's options
(biases, q/k norms per head or over the full width, interleaved rotary, scale, soft-capping), a gated or plain MLP,
and the layer's norm (`norm_spec`: RMSNorm or LayerNorm, eps field, bias) and residual layout (pre-norm, post-norm,
sandwich, parallel attention + MLP) let each family write only what differs."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.model_inputs import AttnMetadata
from lmforge.models.base import CausalLM
from lmforge.nn import (
    LLAMA_NORM,
    ApplyRotaryEmb,
    Attention,
    NormSpec,
    SiluAndMul,
    build_colwise_linear,
    build_merged_colwise_linear,
    build_norm,
    build_qkv_proj,
    build_rowwise_linear,
)
from lmforge.nn.attention import layer_sliding_window

QK_NORMS = (False, "head", "heads", "full")


class LlamaAttention(nn.Module):
    """qkv_bias / o_bias default to the config's attention_bias (Qwen2 biases q/k/v only). qk_norm normalises q and
    k before the rotary embedding with the `norm_spec` norm: "head" (or True) over each head with one weight
    (Qwen3, Gemma 3, Phi), "heads" over each head with a weight per head (Cohere, StableLM), "full" over the whole
    projected width (OLMo 2; under TP the rank's slice, its sum of squares all-reduced). rope_interleave rotates
    pairs (x0, x1), (x2, x3) (Cohere) instead of halves; scale and logit_softcapping are options of the Attention
    op (Gemma 2). qkv_layout 'per_head' loads a fused [heads, 3, head_dim] checkpoint matrix."""

    def __init__(
        self,
        config,
        layer_idx: int = 0,
        qkv_bias: bool | None = None,
        o_bias: bool | None = None,
        qk_norm: bool | str = False,
        norm_weight_offset: float = 0.0,
        scale: float | None = None,
        logit_softcapping: float | None = None,
        norm_spec: NormSpec | None = None,
        rope_interleave: bool = False,
        qkv_layout: str = "qkv",
    ):
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        bias = getattr(config, "attention_bias", False)
        qkv_bias, o_bias = bias if qkv_bias is None else qkv_bias, bias if o_bias is None else o_bias
        self.qkv_proj = build_qkv_proj(
            config.hidden_size, num_heads, num_kv_heads, head_dim, bias=qkv_bias, layout=qkv_layout
        )
        self.qk_norm = "head" if qk_norm is True else qk_norm
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {qk_norm!r}")
        if self.qk_norm:
            spec = norm_spec or NormSpec(weight_offset=norm_weight_offset)
            p = self.qkv_proj
            q_shard, k_shard = (p.tp_size, p.tp_rank), (p.kv_tp_size, p.kv_rank)
            sizes = {
                "head": (head_dim, head_dim),
                "heads": ((num_heads, head_dim), (num_kv_heads, head_dim)),
                "full": (num_heads * head_dim, num_kv_heads * head_dim),
            }[self.qk_norm]
            if self.qk_norm == "full" and spec.kind != "rms":
                raise ValueError("a q/k norm over the full width is an RMSNorm (LayerNorm would need its mean too)")
            if self.qk_norm == "full" and num_kv_heads < p.tp_size:  # replicated heads would count twice
                raise ValueError(f"a k norm over the full width cannot span {num_kv_heads} KV heads on tp={p.tp_size}")
            shards = (None, None) if self.qk_norm == "head" else (q_shard, k_shard)
            full = self.qk_norm == "full"
            self.q_norm = build_norm(spec, config, sizes[0], shards[0], full_width=full)
            self.k_norm = build_norm(spec, config, sizes[1], shards[1], full_width=full)
        self.rope_interleave = rope_interleave
        self.apply_rotary_pos_emb = ApplyRotaryEmb()
        # sliding_window is None for Llama checkpoints; Mistral-style configs and `layer_types` set a window
        self.attn_fwd = Attention(
            num_heads,
            head_dim,
            scale=scale,
            num_kv_heads=num_kv_heads,
            sliding_window=layer_sliding_window(config, layer_idx),
            logit_softcapping=logit_softcapping,
        )
        self.o_proj = build_rowwise_linear(num_heads * head_dim, config.hidden_size, bias=o_bias, is_tp=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary_pos_emb: tuple[torch.Tensor, torch.Tensor] | None,
        past_key_value: tuple[torch.Tensor, torch.Tensor],
        attn_metadata: AttnMetadata,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)
        if self.qk_norm == "full":  # [T, local q | local k | v] widths
            q, k, v = qkv.split(self.qkv_proj.local_sizes, dim=-1)
            qkv = torch.cat((self.q_norm(q), self.k_norm(k), v), dim=-1)
        q, k, v = self.qkv_proj.split_qkv(qkv)  # [T, heads, head_dim] each
        if self.qk_norm in ("head", "heads"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary_pos_emb is not None:
            if self.rope_interleave:  # pairs (x0, x1) rotate together: as [evens | odds] the halves rotate alike;
                # q and k are permuted the same way, so their dot products (all attention sees) are unchanged
                rot = rotary_pos_emb[0].shape[-1]
                q = torch.cat((q[..., 0:rot:2], q[..., 1:rot:2], q[..., rot:]), dim=-1)
                k = torch.cat((k[..., 0:rot:2], k[..., 1:rot:2], k[..., rot:]), dim=-1)
            q, k = self.apply_rotary_pos_emb(q, k, *rotary_pos_emb)
        attn_output = self.attn_fwd(q, k, v, past_key_value[0], past_key_value[1], attn_metadata)
        return self.o_proj(attn_output)


class LlamaMLP(nn.Module):
    """down(act(gate) * up). intermediate_size defaults to the config's (DeepSeek's shared experts differ); act_fn
    to SiLU (Gemma passes its GELU; `build_act(name, gated=True)` maps HF's names)."""

    def __init__(self, config, intermediate_size: int | None = None, act_fn: nn.Module | None = None):
        super().__init__()
        size = config.intermediate_size if intermediate_size is None else intermediate_size
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = build_merged_colwise_linear(config.hidden_size, [size, size], bias=bias)
        self.act_fn = SiluAndMul(inplace=True) if act_fn is None else act_fn
        self.down_proj = build_rowwise_linear(size, config.hidden_size, bias=bias, is_tp=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class PlainMLP(nn.Module):
    """fc2(act(fc1(x))), the ungated MLP (Phi, GPT-2); act_fn from `build_act(config.hidden_act)`."""

    def __init__(self, config, act_fn: nn.Module, intermediate_size: int | None = None, bias: bool = True):
        super().__init__()
        size = config.intermediate_size if intermediate_size is None else intermediate_size
        self.fc1 = build_colwise_linear(config.hidden_size, size, bias=bias)
        self.act_fn = act_fn
        self.fc2 = build_rowwise_linear(size, config.hidden_size, bias=bias, is_tp=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn(self.fc1(x)))


RESIDUAL_LAYOUTS = ("pre", "post", "sandwich", "parallel")


class LlamaDecoderLayer(nn.Module):
    """A decoder layer under models/base.py's residual contract. A family overrides build_attention / build_mlp and
    sets, as class attributes, `norm_spec` (all norms of the stack, the final one included) and `residual_layout`:

    - "pre" (Llama): x + attn(norm(x)), then x + mlp(norm(x)); norms input_layernorm, post_attention_layernorm.
    - "parallel" (Phi, Cohere, GPT-J): x + attn(norm(x)) + mlp(norm(x)), one input_layernorm.
    - "sandwich" (Gemma 2): x + norm(attn(norm(x))), then x + norm(mlp(norm(x))); input_layernorm,
      post_attention_layernorm, pre_feedforward_layernorm, post_feedforward_layernorm.
    - "post" (OLMo 2): x + norm(attn(x)), then x + norm(mlp(x)); post_attention_layernorm,
      post_feedforward_layernorm.

    residual_multiplier scales what attention and the MLP add to the stream (Granite; not under "sandwich")."""

    norm_spec: NormSpec = LLAMA_NORM
    residual_layout = "pre"

    def __init__(self, config, layer_idx: int):
        super().__init__()
        if self.residual_layout not in RESIDUAL_LAYOUTS:
            raise ValueError(f"residual_layout must be one of {RESIDUAL_LAYOUTS}, got {self.residual_layout!r}")
        self.self_attn = self.build_attention(config, layer_idx)
        self.mlp = self.build_mlp(config, layer_idx)
        names = {
            "pre": ("input_layernorm", "post_attention_layernorm"),
            "parallel": ("input_layernorm",),
            "sandwich": (
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
            ),
            "post": ("post_attention_layernorm", "post_feedforward_layernorm"),
        }[self.residual_layout]
        for name in names:
            setattr(self, name, build_norm(self.norm_spec, config, config.hidden_size))
        self.residual_multiplier = 1.0

    def build_attention(self, config, layer_idx: int) -> nn.Module:
        return LlamaAttention(config, layer_idx)

    def build_mlp(self, config, layer_idx: int) -> nn.Module:
        return LlamaMLP(config)

    def forward(self, hidden_states, rotary_pos_emb, past_key_value, residual, attn_metadata):
        def attn(x: torch.Tensor) -> torch.Tensor:
            return self.self_attn(x, rotary_pos_emb, past_key_value, attn_metadata)

        m, layout = self.residual_multiplier, self.residual_layout
        if layout == "post":  # no norm before the sublayers to fuse the residual add into: add it here
            residual = hidden_states if residual is None else hidden_states + residual
            residual = residual + self._scaled(self.post_attention_layernorm(attn(residual)), m)
            return self._scaled(self.post_feedforward_layernorm(self.mlp(residual)), m), residual
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        if layout == "parallel":
            return self._scaled(attn(hidden_states) + self.mlp(hidden_states), m), residual
        if layout == "sandwich":
            hidden_states = self.post_attention_layernorm(attn(hidden_states))
            hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
            return self.post_feedforward_layernorm(self.mlp(hidden_states)), residual
        hidden_states, residual = self.post_attention_layernorm(self._scaled(attn(hidden_states), m), residual)
        return self._scaled(self.mlp(hidden_states), m), residual

    @staticmethod
    def _scaled(x: torch.Tensor, multiplier: float) -> torch.Tensor:
        return x * multiplier if multiplier != 1.0 else x


class LlamaForCausalLM(CausalLM):
    decoder_layer_cls = LlamaDecoderLayer
