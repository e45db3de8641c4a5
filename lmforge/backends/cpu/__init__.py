"""Pure PyTorch reference backend: runs anywhere, and every CUDA kernel is tested against it."""

from .activation import activation, gelu_and_mul, silu_and_mul
from .attention import fill_kv_cache, paged_attention
from .moe import fused_moe
from .norm import layer_norm, rms_norm, sharded_rms_norm
from .rotary import apply_rotary

OPS = {
    "rms_norm": rms_norm,
    "sharded_rms_norm": sharded_rms_norm,
    "layer_norm": layer_norm,
    "activation": activation,
    "silu_and_mul": silu_and_mul,
    "gelu_and_mul": gelu_and_mul,
    "apply_rotary": apply_rotary,
    "fill_kv_cache": fill_kv_cache,
    "paged_attention": paged_attention,
    "fused_moe": fused_moe,
}
