"""CUDA backend: the ops lmforge.nn asks for, served by the Triton kernels of lmforge.kernels.cuda.
An op missing here (layer_norm, sharded_rms_norm) falls back to the cpu reference (the registry does that),
which runs on CUDA tensors too."""

import torch

from lmforge.kernels.cuda.argmax import argmax_rows

from .activation import activation, gelu_and_mul, silu_and_mul
from .attention import fill_kv_and_attend, fill_kv_cache, paged_attention
from .linear import linear
from .moe import fused_moe
from .norm import rms_norm
from .quant import (
    fp8_linear,
    fp8_prepare,
    fused_moe_quantized,
    fused_moe_quantized_prepare,
    int8_linear,
    int8_prepare,
    wna16_linear,
    wna16_prepare,
)
from .rotary import apply_rotary, rotary_cos_sin

OPS = {
    "argmax_rows": argmax_rows,
    "embedding": torch.nn.functional.embedding,
    "linear": linear,
    "rms_norm": rms_norm,
    "silu_and_mul": silu_and_mul,
    "gelu_and_mul": gelu_and_mul,
    "activation": activation,
    "apply_rotary": apply_rotary,
    "rotary_cos_sin": rotary_cos_sin,
    "fill_kv_cache": fill_kv_cache,
    "fill_kv_and_attend": fill_kv_and_attend,
    "paged_attention": paged_attention,
    "fused_moe": fused_moe,
    "wna16_prepare": wna16_prepare,
    "wna16_linear": wna16_linear,
    "fp8_prepare": fp8_prepare,
    "fp8_linear": fp8_linear,
    "int8_prepare": int8_prepare,
    "int8_linear": int8_linear,
    "fused_moe_quantized": fused_moe_quantized,
    "fused_moe_quantized_prepare": fused_moe_quantized_prepare,
}
