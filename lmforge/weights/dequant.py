"""Dequantize GGUF tensor bytes with torch ops, on whatever device the bytes live.

Torch runs each step multi-threaded (or on the GPU when the bytes were moved there first), which is several
times faster than `gguf.quants.dequantize`'s numpy path; types without a kernel here fall back to that path.
Block layouts follow ggml's `block_q*` structs: a float16 scale (and min) per block, then packed quants.
"""

from collections.abc import Callable
from functools import cache

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

_Q = GGMLQuantizationType


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """`raw`: the stored uint8 bytes of one tensor; returns a new `shape` tensor of `dtype` on `raw.device`.

    Raises NotImplementedError for a type neither this module nor the gguf package can dequantize.
    """
    qtype = _Q(ggml_type)
    if qtype in _FLOAT_TYPES:
        return raw.view(_FLOAT_TYPES[qtype]).reshape(shape).to(dtype, copy=True)
    kernel = _KERNELS.get(qtype)
    if kernel is None:
        return _dequantize_numpy(raw, qtype, shape).to(device=raw.device, dtype=dtype)
    blocks = raw.view(-1, GGML_QUANT_SIZES[qtype][1])
    return kernel(blocks).reshape(shape).to(dtype)


@cache
def can_dequantize(ggml_type: int) -> bool:
    """Whether `dequantize` handles this type: a kernel here, or the gguf package's numpy code (probed on one
    zero block, since gguf.quants does not list what it supports)."""
    qtype = _Q(ggml_type)
    if qtype in _FLOAT_TYPES or qtype in _KERNELS:
        return True
    try:
        quants.dequantize(np.zeros(GGML_QUANT_SIZES[qtype][1], dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _dequantize_numpy(raw: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    data = raw.cpu().numpy()
    values = quants.dequantize(data, qtype)  # flat bytes in, flat float32 out
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 stored at byte `start` of each block, as [num_blocks, 1] float32."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2n] integers: all low nibbles first, then all high nibbles (ggml's order)."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def _float_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """`_nibbles` converted into one float32 buffer that the scales are then applied to in place.

    Filling the halves of a preallocated buffer saves the concatenated copy and a separate output tensor,
    about 1.5x faster than `_nibbles(...).float() * d` on CPU.
    """
    out = torch.empty(*packed.shape[:-1], 2, packed.shape[-1], device=packed.device)
    out.select(-2, 0).copy_(packed & 0x0F)
    out.select(-2, 1).copy_(packed >> 4)
    return out.flatten(-2)


def _bits(words: torch.Tensor, num_bits: int) -> torch.Tensor:
    """[num_blocks, 1] int32 -> [num_blocks, num_bits] of its low `num_bits` bits, bit 0 first."""
    shifts = torch.arange(num_bits, device=words.device, dtype=torch.int32)
    return (words >> shifts) & 1


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:  # d, 16 bytes of quants; x = d * (q - 8)
    return _float_nibbles(blocks[:, 2:18]).sub_(8).mul_(_half(blocks, 0))


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:  # d, m, 16 bytes of quants; x = d * q + m
    q = _float_nibbles(blocks[:, 4:20])
    return torch.addcmul(_half(blocks, 2), _half(blocks, 0), q, out=q)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:  # d, 32 high bits, 16 bytes of low nibbles; x = d * (q - 16)
    high = _bits(blocks[:, 2:6].contiguous().view(torch.int32), 32)
    q = (_nibbles(blocks[:, 6:22]).to(torch.int32) | (high << 4)) - 16
    return _half(blocks, 0) * q


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:  # d, m, 32 high bits, 16 bytes of low nibbles; x = d * q + m
    high = _bits(blocks[:, 4:8].contiguous().view(torch.int32), 32)
    q = _nibbles(blocks[:, 8:24]).to(torch.int32) | (high << 4)
    return torch.addcmul(_half(blocks, 2), _half(blocks, 0), q.float())


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:  # d, 32 int8 quants
    return blocks[:, 2:34].contiguous().view(torch.int8).float().mul_(_half(blocks, 0))


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes 0-15 of a Q4_K/Q5_K block -> (d * scale, dmin * min) per 32-value sub-block, [num_blocks, 8, 1].

    Bytes 4-15 pack 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4): sub-blocks 0-3 keep their
    6 bits in bytes 4-11; sub-blocks 4-7 keep the low 4 bits in bytes 12-15 and borrow the top 2 bits of 4-11.
    """
    low, mid, top = blocks[:, 4:8], blocks[:, 8:12], blocks[:, 12:16]
    scales = torch.cat([low & 63, (top & 0x0F) | ((low >> 6) << 4)], dim=1)
    mins = torch.cat([mid & 63, (top >> 4) | ((mid >> 6) << 4)], dim=1)
    return (_half(blocks, 0) * scales).unsqueeze(-1), (_half(blocks, 2) * mins).unsqueeze(-1)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:  # d, dmin, 12 scale bytes, 128 quant bytes; 8 x 32 values
    scales, mins = _k_scales(blocks)
    # each 32-byte chunk holds two sub-blocks: its low nibbles, then its high nibbles
    q = _float_nibbles(blocks[:, 16:144].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    return q.mul_(scales).sub_(mins).reshape(-1, 256)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:  # d, dmin, 12 scale bytes, 32 high-bit bytes, 128 quant bytes
    scales, mins = _k_scales(blocks)
    # bit j of high byte l is the fifth bit of value l in sub-block j
    shifts = torch.arange(8, device=blocks.device, dtype=torch.uint8).view(1, 8, 1)
    high = (blocks[:, 16:48].unsqueeze(1) >> shifts) & 1
    q = _nibbles(blocks[:, 48:176].reshape(-1, 4, 32)).reshape(-1, 8, 32) | (high << 4)
    return q.float().mul_(scales).sub_(mins).reshape(-1, 256)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:  # 128 low-nibble bytes, 64 high-bit bytes, 16 int8 scales, d
    # Two halves of 128 values. In a half, the four 32-value groups take low nibbles of bytes 0-31, of
    # bytes 32-63, high nibbles of 0-31, of 32-63; their top 2 bits are bits 0-1, 2-3, 4-5, 6-7 of 32 qh bytes.
    low = _nibbles(blocks[:, 0:128].reshape(-1, 2, 64)).reshape(-1, 2, 4, 32)
    shifts = torch.tensor([0, 2, 4, 6], device=blocks.device, dtype=torch.uint8).view(1, 1, 4, 1)
    high = (blocks[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3
    q = (low | (high << 4)).to(torch.int16) - 32
    scales = blocks[:, 192:208].contiguous().view(torch.int8) * _half(blocks, 208)  # one per 16 values
    return (scales.unsqueeze(-1) * q.reshape(-1, 16, 16)).reshape(-1, 256)


_FLOAT_TYPES = {_Q.F32: torch.float32, _Q.F16: torch.float16, _Q.BF16: torch.bfloat16, _Q.F64: torch.float64}
_KERNELS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    _Q.Q4_0: _q4_0,
    _Q.Q4_1: _q4_1,
    _Q.Q5_0: _q5_0,
    _Q.Q5_1: _q5_1,
    _Q.Q8_0: _q8_0,
    _Q.Q4_K: _q4_k,
    _Q.Q5_K: _q5_k,
    _Q.Q6_K: _q6_k,
}
