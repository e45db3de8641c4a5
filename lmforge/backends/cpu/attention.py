"""Attention over the paged KV cache, in plain torch.

The batch is flat (sequence i owns q rows q_start_loc[i] : +q_seqlens[i]); for the math we pad
queries to [num_seqs, max_q, heads, dim] and gather each sequence's cache blocks into
[num_seqs, max_blocks * block_size, kv_heads, dim]. Padding indices and masks are built once
per step (first layer) and kept in attn_metadata.scratch for the other layers.

Quantized caches (QuantizedCache, quant_policy 8/4) are written through quantize_kv and read through
dequantize_kv; an FP8 (e4m3) cache is a float8_e4m3fn tensor with scale 1.0, values clamped to +-448; a float16
cache below float32 compute (kv_cache_dtype='float16', the CPU default under dtype 'auto') rounds to nearest even,
values clamped to +-65504, and is read back as float32. These functions define the formats: the CUDA kernels and
the CPU attention kernel (lmforge/kernels/cpu/attention.c) are tested against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.kernels import cpu as cpu_kernels
from lmforge.model_inputs import AttnMetadata, AttnOptions, QuantizedCache

# the largest finite float8_e4m3fn / float16 values: an FP8 / float16 cache clamps to them (the cast of a larger
# value is not finite)
FP8_E4M3_MAX = 448.0
FP16_MAX = 65504.0
# the smallest value range of a quantized row: a constant row (all zeros, say) gets a finite scale, not 0
_QUANT_MIN_RANGE = 1e-6


def quantize_kv(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] -> (q [..., head_dim * bits // 8] uint8, scales_zeros [..., 2] float32), one asymmetric
    (scale, zero point) per row of head_dim values; int4 packs channels 2i / 2i + 1 into the low / high nibble."""
    qmax = (1 << bits) - 1
    x = x.float()
    lo = x.amin(-1, keepdim=True)
    value_range = (x.amax(-1, keepdim=True) - lo).clamp_min(_QUANT_MIN_RANGE)
    inv_scale = qmax / value_range
    q = torch.floor((x - lo) * inv_scale + 0.5).clamp_(0, qmax).to(torch.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q, torch.cat([value_range / qmax, -lo * inv_scale], -1)


def dequantize_kv(q: torch.Tensor, scales_zeros: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of quantize_kv: (q - zero) * scale, [..., head_dim] in dtype."""
    if bits == 4:
        q = torch.stack([q & 15, q >> 4], -1).flatten(-2)
    return ((q.float() - scales_zeros[..., 1:]) * scales_zeros[..., :1]).to(dtype)


def _write(cache: torch.Tensor | QuantizedCache, x: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    if isinstance(cache, QuantizedCache):
        q, scales_zeros = quantize_kv(x, cache.bits)
        _write(cache.data, q, slot_mapping)
        _write(cache.scales_zeros, scales_zeros, slot_mapping)
        return
    if cache.dtype == torch.float8_e4m3fn:  # CPU index_copy_ has no float8 kernel: copy the bytes
        x = x.float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(cache.dtype).view(torch.uint8)
        cache = cache.view(torch.uint8)
    elif cache.dtype == torch.float16 and x.dtype != torch.float16:
        x = x.float().clamp(-FP16_MAX, FP16_MAX)  # in float32: bfloat16 rounds 65504 up to 65536
    num_blocks, block_size = cache.shape[:2]
    cache.view(num_blocks * block_size, *cache.shape[2:]).index_copy_(0, slot_mapping, x.to(cache.dtype))


def fill_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor | None,
    k_cache: torch.Tensor | QuantizedCache,
    v_cache: torch.Tensor | QuantizedCache | None,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value [num_tokens, kv_heads, dim] into the slots named by slot_mapping."""
    _write(k_cache, key, slot_mapping)
    if value is not None and v_cache is not None:
        _write(v_cache, value, slot_mapping)


def _step_layout(meta: AttnMetadata, sliding_window: int | None, device: torch.device) -> dict:
    key = ("layout", sliding_window)
    if key in meta.scratch:
        return meta.scratch[key]
    num_seqs, block_size = meta.num_seqs, meta.block_size
    max_q = meta.max_q_seqlen
    num_blocks = (meta.max_kv_seqlen + block_size - 1) // block_size
    kv_len = num_blocks * block_size
    q_lens = torch.tensor(meta.q_seqlens_list, device=device)
    kv_lens = torch.tensor(meta.kv_seqlens_list, device=device)
    # destination row of every flat query token in the padded [num_seqs * max_q] layout
    seq_ids = torch.repeat_interleave(torch.arange(num_seqs, device=device), q_lens)
    starts = torch.cumsum(q_lens, 0) - q_lens
    local = torch.arange(int(q_lens.sum()), device=device) - starts[seq_ids]
    dst = seq_ids * max_q + local
    # query position of padded row (b, i) and the causal (+ window) mask over key positions
    qpos = (kv_lens - q_lens)[:, None] + torch.arange(max_q, device=device)[None, :]  # [num_seqs, max_q]
    kpos = torch.arange(kv_len, device=device)
    mask = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < kv_lens[:, None, None])
    if sliding_window is not None:
        mask &= (qpos[:, :, None] - kpos[None, None, :]) < sliding_window
    mask[:, :, 0] |= ~mask.any(-1)  # padded rows must see one key or softmax gives NaN; they are dropped
    layout = {
        "dst": dst,
        "mask": mask[:, None],  # [num_seqs, 1, max_q, kv_len]
        "block_tables": meta.block_tables[:, :num_blocks].long(),
        # additive form of the mask for the decode path: 0 where visible, -inf elsewhere
        "bias": torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_fill_(~mask, float("-inf"))[:, None],
    }
    meta.scratch[key] = layout
    return layout


def _gather(cache: torch.Tensor | QuantizedCache, block_tables: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # cache [num_blocks, block_size, heads, dim] -> [num_seqs, heads, max_blocks * block_size, dim] in dtype
    if isinstance(cache, QuantizedCache):
        g = dequantize_kv(cache.data[block_tables], cache.scales_zeros[block_tables], cache.bits, dtype)
    else:
        g = cache[block_tables].to(dtype)
    return g.flatten(1, 2).transpose(1, 2)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor | QuantizedCache,
    v_cache: torch.Tensor | QuantizedCache,
    attn_metadata: AttnMetadata,
    options: AttnOptions,
) -> torch.Tensor:
    """query [num_tokens, heads, dim] -> [num_tokens, heads, v_dim]; the cache already holds this step's keys."""
    meta = attn_metadata
    scale, sliding_window, logit_softcapping = options.scale, options.sliding_window, options.logit_softcapping
    v_head_dim = options.v_head_dim
    num_tokens, num_heads, head_dim = query.shape
    out = _kernel_attention(query, k_cache, v_cache, meta, options)
    if out is not None:
        return out
    layout = _step_layout(meta, sliding_window, query.device)
    num_seqs, max_q = meta.num_seqs, meta.max_q_seqlen
    # slots past a sequence's length hold zeros or stale finite values (the CPU cache starts zeroed), and
    # the mask gives them zero weight
    k = _gather(k_cache, layout["block_tables"], query.dtype)
    v = k if v_cache is k_cache else _gather(v_cache, layout["block_tables"], query.dtype)
    if v_head_dim is not None and v.shape[-1] != v_head_dim:
        v = v[..., :v_head_dim]
    if max_q == 1:
        return _decode(query, k, v, layout["bias"], scale, logit_softcapping)
    q = query.new_zeros(num_seqs * max_q, num_heads, head_dim)
    q[layout["dst"]] = query
    q = q.view(num_seqs, max_q, num_heads, head_dim).transpose(1, 2)  # [num_seqs, heads, max_q, dim]
    mask = layout["mask"]
    if logit_softcapping:
        rep = num_heads // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        scores = torch.tanh(scores / logit_softcapping) * logit_softcapping
        scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.matmul(scores.softmax(-1), v.float()).to(query.dtype)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != num_heads)
    out = out.transpose(1, 2)  # [num_seqs, max_q, heads, v_dim]
    return out.reshape(num_seqs * max_q, num_heads, out.shape[-1])[layout["dst"]]


# from this many sequences on, the decode path runs one strided batched GEMM pair per KV head (no copy of the
# gathered keys); below it, one copy and two matmuls over all heads are fewer ops for the same bytes
_PER_HEAD_DECODE_MIN_SEQS = 4


def _decode(
    query: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    logit_softcapping: float | None,
) -> torch.Tensor:
    """One query per sequence: two batched matmuls with the query heads of each KV head grouped, which
    CPU BLAS runs far faster than a masked scaled_dot_product_attention call.

    k / v are [seqs, kv_heads, kv_len, dim] views of gathered [seqs, kv_len, kv_heads, dim] tensors. For a large
    batch, each KV head's [seqs, kv_len, dim] slice is a plain strided batch that the GEMM reads in place
    (1.2x-4x faster at 8-32 sequences of 256-384 tokens on a 2-core AVX-512 Xeon than copying all keys first)."""
    num_seqs, num_heads, head_dim = query.shape
    kv_heads = k.shape[1]
    group = num_heads // kv_heads
    q = query.view(num_seqs, kv_heads, group, head_dim)  # [seqs, kv_heads, group, dim]
    if num_seqs < _PER_HEAD_DECODE_MIN_SEQS:
        # the gathered keys have kv_len strided: one copy first is cheaper than letting the matmul walk them
        scores = torch.matmul(q, k.contiguous().transpose(-1, -2)).float() * scale  # [seqs, kv_heads, group, kv_len]
        if logit_softcapping:
            scores = torch.tanh(scores / logit_softcapping) * logit_softcapping
        probs = (scores + bias).softmax(-1).to(v.dtype)  # bias [seqs, 1, 1, kv_len]
        return torch.matmul(probs, v).reshape(num_seqs, num_heads, v.shape[-1])
    k_rows, v_rows = k.transpose(1, 2), v.transpose(1, 2)  # [seqs, kv_len, kv_heads, dim]
    bias = bias[:, 0]  # [seqs, 1, kv_len]
    out = query.new_empty(kv_heads, num_seqs, group, v.shape[-1])
    fused = query.dtype == torch.float32 and not logit_softcapping
    for h in range(kv_heads):
        keys_t = k_rows[:, :, h].transpose(1, 2)  # [seqs, dim, kv_len], read in place
        if fused:
            scores = torch.baddbmm(bias, q[:, h], keys_t, alpha=scale)  # bias + scale * q k^T
        else:
            scores = torch.bmm(q[:, h], keys_t).float() * scale
            if logit_softcapping:
                scores = torch.tanh(scores / logit_softcapping) * logit_softcapping
            scores = scores + bias
        torch.bmm(scores.softmax(-1).to(v.dtype), v_rows[:, :, h], out=out[h])
    return out.transpose(0, 1).reshape(num_seqs, num_heads, v.shape[-1])


def _kernel_attention(query, k_cache, v_cache, meta, options: AttnOptions, key=None, value=None):
    """lmforge's CPU attention kernel (writing key/value to the cache first, when given); None where it does not
    apply: softcapping, or what cpu_kernels.paged_attention declines (the kernels off, a quantized cache, ...)."""
    if options.logit_softcapping:
        return None
    return cpu_kernels.paged_attention(
        query, k_cache, v_cache, meta, options.scale, options.sliding_window, options.v_head_dim, key, value
    )


def fill_kv_and_attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor | None,
    k_cache: torch.Tensor | QuantizedCache,
    v_cache: torch.Tensor | QuantizedCache | None,
    attn_metadata: AttnMetadata,
    options: AttnOptions,
) -> torch.Tensor:
    """fill_kv_cache with this step's keys/values, then paged_attention: query [T, heads, d] -> [T, heads, v_d]."""
    out = _kernel_attention(query, k_cache, v_cache, attn_metadata, options, key, value)
    if out is not None:  # one call wrote the cache and attended
        return out
    fill_kv_cache(key, value, k_cache, v_cache, attn_metadata.slot_mapping)
    return paged_attention(query, k_cache, v_cache, attn_metadata, options)
