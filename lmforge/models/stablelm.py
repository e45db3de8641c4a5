"""StableLM 2 / StableLM Zephyr (StableLmForCausalLM): LayerNorm with bias, rotary over part of each head
(partial_rotary_factor), optional q/k/v biases (use_qkv_bias), optional per-head q/k LayerNorms with a weight per
head (qk_layernorm), and attention and MLP in parallel off one norm when use_parallel_residual is set."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from lmforge.models.base import CausalLM
from lmforge.models.llama import LlamaAttention, LlamaDecoderLayer
from lmforge.nn import LAYER_NORM, NormSpec

_PER_HEAD_NORM = re.compile(r"(.*\.self_attn\.)([qk])_layernorm\.norms\.(\d+)\.weight$")


class StableLmDecoderLayer(LlamaDecoderLayer):
    norm_spec = LAYER_NORM

    def __init__(self, config, layer_idx: int):
        self.residual_layout = "parallel" if config.use_parallel_residual else "pre"
        super().__init__(config, layer_idx)

    def build_attention(self, config, layer_idx: int) -> nn.Module:
        return LlamaAttention(
            config,
            layer_idx,
            qkv_bias=config.use_qkv_bias,
            o_bias=False,
            qk_norm="heads" if config.qk_layernorm else False,
            norm_spec=NormSpec("layer", "layer_norm_eps", bias=False),
        )


class StableLmForCausalLM(CausalLM):
    decoder_layer_cls = StableLmDecoderLayer

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(self._stack_head_norms(weights))

    def _stack_head_norms(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint holds one LayerNorm per head (q_layernorm.norms.<h>.weight); we hold one
        [heads, head_dim] weight (q_norm.weight): gather each layer's heads, in order, into it."""
        pending: dict[str, dict[int, torch.Tensor]] = {}
        num_heads = {"q": self.config.num_attention_heads, "k": self.config.num_key_value_heads}
        for name, tensor in weights:
            match = _PER_HEAD_NORM.match(name)
            if match is None:
                yield name, tensor
                continue
            prefix, which, head = match.group(1), match.group(2), int(match.group(3))
            target = f"{prefix}{which}_norm.weight"
            heads = pending.setdefault(target, {})
            heads[head] = tensor
            if len(heads) == num_heads[which]:
                yield target, torch.stack([heads[h] for h in range(num_heads[which])])
                del pending[target]
        if pending:
            raise ValueError(f"the checkpoint lacks some per-head q/k norm weights of {sorted(pending)}")
