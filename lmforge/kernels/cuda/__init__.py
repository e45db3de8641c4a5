"""Triton kernels for the cuda backend, one op family per module (activation, rms_norm, rotary,
fill_kv_cache, decode_attention, prefill_attention, fused_moe). Each holds private `_*_kernel` functions and one
public launcher that checks shapes and strides and allocates outputs; lmforge.backends.cuda calls them."""
