"""Pure PyTorch reference backend: runs anywhere, and every CUDA kernel is tested against it."""

import torch

from lmforge.kernels import cpu as cpu_kernels

from .activation import activation, gelu_and_mul, silu_and_mul
from .attention import fill_kv_and_attend, fill_kv_cache, paged_attention
from .moe import fused_moe
from .norm import layer_norm, rms_norm, sharded_rms_norm
from .quant import (
    dequantize_fp8,
    dequantize_int8,
    dequantize_wna16,
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

linear = torch.nn.functional.linear


def embedding(input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Rows of weight [V, D] for input_ids [...] -> [..., D] (the CPU kernel where it takes them)."""
    out = cpu_kernels.embedding(input_ids, weight)
    return out if out is not None else torch.nn.functional.embedding(input_ids, weight)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [rows, n] -> [rows] int64: the first index of each row's max (the greedy token)."""
    return x.argmax(dim=-1)


OPS = {
    "argmax_rows": argmax_rows,
    "embedding": embedding,
    "linear": linear,  # F.linear: x [..., K], weight [N, K], bias [N] -> [..., N]
    "rms_norm": rms_norm,
    "sharded_rms_norm": sharded_rms_norm,
    "layer_norm": layer_norm,
    "activation": activation,
    "silu_and_mul": silu_and_mul,
    "gelu_and_mul": gelu_and_mul,
    "apply_rotary": apply_rotary,
    "rotary_cos_sin": rotary_cos_sin,
    "fill_kv_cache": fill_kv_cache,
    "fill_kv_and_attend": fill_kv_and_attend,
    "paged_attention": paged_attention,
    "fused_moe": fused_moe,
    # quantized linear schemes (QUANT_CONTRACT.md); *_dequantize give the fp32 weight [N, K] of the canonical form
    "wna16_prepare": wna16_prepare,
    "wna16_linear": wna16_linear,
    "wna16_dequantize": dequantize_wna16,
    "fp8_prepare": fp8_prepare,
    "fp8_linear": fp8_linear,
    "fp8_dequantize": dequantize_fp8,
    "int8_prepare": int8_prepare,
    "int8_linear": int8_linear,
    "int8_dequantize": dequantize_int8,
    "fused_moe_quantized": fused_moe_quantized,
    "fused_moe_quantized_prepare": fused_moe_quantized_prepare,
}
