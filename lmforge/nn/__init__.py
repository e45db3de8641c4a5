"""Fused-op builders that model files are written with. Each op asks the backend registry for
its implementation once, so a model file never mentions CUDA, TP or quantization."""

from .activation import Activation, GeluAndMul, SiluAndMul, build_act
from .attention import Attention
from .embedding import Embedding, build_embedding
from .linear import (
    build_colwise_linear,
    build_merged_colwise_linear,
    build_qkv_proj,
    build_rowwise_linear,
    default_weight_loader,
)
from .norm import LAYER_NORM, LLAMA_NORM, LayerNorm, NormSpec, RMSNorm, build_norm
from .rotary import ApplyRotaryEmb, build_rotary_embedding, build_rotary_embedding_from_config, rope_parameters

__all__ = [
    "LAYER_NORM",
    "LLAMA_NORM",
    "Activation",
    "ApplyRotaryEmb",
    "Attention",
    "Embedding",
    "GeluAndMul",
    "LayerNorm",
    "NormSpec",
    "RMSNorm",
    "SiluAndMul",
    "build_act",
    "build_colwise_linear",
    "build_embedding",
    "build_merged_colwise_linear",
    "build_norm",
    "build_qkv_proj",
    "build_rotary_embedding",
    "build_rotary_embedding_from_config",
    "build_rowwise_linear",
    "default_weight_loader",
    "rope_parameters",
]
