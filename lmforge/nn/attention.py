"""Attention over the paged KV cache: writes this step's keys/values into the cache, then
attends each query to its sequence's cached keys. Sliding windows and logit soft-capping
are options of the op (AttnOptions), not model code. The cache may be quantized (QuantizedCache, FP8): the
backend op reads its format from the cache itself, so a model file passes k_cache / v_cache through untouched."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.backends.registry import current_build_context, get_op
from lmforge.model_inputs import AttnMetadata, AttnOptions, QuantizedCache


class Attention(nn.Module):
    """num_heads / num_kv_heads are the model's totals; under TP each rank keeps its share."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float | None = None,
        num_kv_heads: int | None = None,
        v_head_size: int | None = None,
        sliding_window: int | None = None,
        logit_softcapping: float | None = None,
        **kwargs,
    ):
        super().__init__()
        tp = current_build_context().tp_size
        num_kv_heads = num_kv_heads or num_heads
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.head_size = head_size
        self.v_head_size = v_head_size or head_size
        self.scale = scale if scale is not None else head_size**-0.5
        self.sliding_window = sliding_window if sliding_window and sliding_window > 0 else None
        self.logit_softcapping = logit_softcapping or None
        self.options = AttnOptions(self.scale, self.sliding_window, self.logit_softcapping, self.v_head_size)
        self.fill_kv_and_attend = get_op("fill_kv_and_attend")  # one kernel for a decode step on cuda
        self.attention = get_op("paged_attention")

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None,
        value: torch.Tensor | None,
        k_cache: torch.Tensor | QuantizedCache,
        v_cache: torch.Tensor | QuantizedCache,
        attn_metadata: AttnMetadata,
    ) -> torch.Tensor:
        """query [T, heads, d], key/value [T, kv_heads, d] (None: already cached) -> [T, heads * v_d]."""
        if key is not None:
            out = self.fill_kv_and_attend(query, key, value, k_cache, v_cache, attn_metadata, self.options)
        else:
            out = self.attention(query, k_cache, v_cache, attn_metadata, self.options)
        return out.flatten(-2)


def layer_sliding_window(config, layer_idx: int) -> int | None:
    """The attention window of layer `layer_idx` under an HF config (None: full attention).

    transformers 5 lists each layer's kind in `layer_types` (Gemma2/3 alternate, Qwen2 slides from
    `max_window_layers` on); without it a `sliding_window` applies to every layer (Mistral) unless
    `use_sliding_window` is off (Qwen2 configs of transformers 4)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if not getattr(config, "use_sliding_window", True):
        return None
    if layer_idx < (getattr(config, "max_window_layers", None) or 0):
        return None
    return window
