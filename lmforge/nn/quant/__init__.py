"""Quantized checkpoints through the linear builders: formats (config), per-layer tensors and their shards
(layer), the layer's quantized half (linear), bit packing (packing). See lmforge/nn/quant/layer.py for how a
layer decides whether it is quantized."""

from .config import LayerScheme, QuantConfig, QuantConfigError, parse_quant_config
from .layer import QuantLoadError
from .linear import attach_quant_states, finish_loading

__all__ = [
    "LayerScheme",
    "QuantConfig",
    "QuantConfigError",
    "QuantLoadError",
    "attach_quant_states",
    "finish_loading",
    "parse_quant_config",
]
