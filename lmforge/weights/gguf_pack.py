"""GGUF block types as int4 planes of group 32, the form torch's packed int4 CPU matmul reads.

Every type here stores, per block of 32 values along a row (Q4_K/Q5_K: per 32-value sub-block), an integer
code v, a float scale s and a float min m with w = v * s + m (ggml's dequantize_row_*; Q4_0 is m = -8s, Q8_0
m = 0, Q4_K/Q5_K s = d * sc and m = -dmin * mn from the 6-bit sub-block scales). 4-bit codes are one plane.
5- and 8-bit codes split exactly into two 4-bit planes: v = lo + 16 * hi with lo = v & 15 and hi = v >> 4
(arithmetic: [-8, 8) for Q8_0, {0, 1} for 5-bit), so w = (lo * s + m) + ((hi + 8) * 16s - 128s); plane 1 stores
hi + 8 so that torch's kernel, which computes (code - 8) * scale + offset, gets an offset of exactly 0 there.
A matmul over the planes is one int4 matmul over [x, x] (K twice over). Q6_K's scales cover 16 values, below the
kernel's smallest group (32): it stays dense. Used by weights/gguf.py; the layer side is nn/quant (kind 'gguf').
"""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lmforge.kernels import cpu as cpu_kernels
from lmforge.weights.dequant import _half, _k_scales, _nibbles

_Q = GGMLQuantizationType
GROUP = 32
# type -> number of int4 planes
PLANES = {_Q.Q4_0: 1, _Q.Q4_1: 1, _Q.Q4_K: 1, _Q.Q5_0: 2, _Q.Q5_1: 2, _Q.Q5_K: 2, _Q.Q8_0: 2}


def _high_bits(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The 32 fifth bits of a Q5_0/Q5_1 block (a little-endian uint32 at `start`), bit j for value j: [nb, 32]."""
    words = blocks[:, start : start + 4].contiguous().view(torch.int32)
    return (words >> torch.arange(32, dtype=torch.int32)) & 1


def _codes(blocks: torch.Tensor, qtype: _Q) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocks [nb, type_size] uint8 of a 5- or 8-bit type -> (codes int16 [nb, B], scales float32 [nb, B / 32],
    mins [nb, B / 32]). int4_planes reads the 4-bit types (and Q8_0) straight from the bytes instead."""
    if qtype == _Q.Q5_0:
        d = _half(blocks, 0)
        return (_nibbles(blocks[:, 6:22]).short() | (_high_bits(blocks, 2).short() << 4)), d, -16 * d
    if qtype == _Q.Q5_1:
        codes = _nibbles(blocks[:, 8:24]).short() | (_high_bits(blocks, 4).short() << 4)
        return codes, _half(blocks, 0), _half(blocks, 2)
    if qtype == _Q.Q8_0:
        d = _half(blocks, 0)
        return blocks[:, 2:34].contiguous().view(torch.int8).short(), d, torch.zeros_like(d)
    if qtype in (_Q.Q4_K, _Q.Q5_K):
        scales, mins = (t.squeeze(-1) for t in _k_scales(blocks))  # [nb, 8] each
        quants = blocks[:, 16:144] if qtype == _Q.Q4_K else blocks[:, 48:176]
        # each 32-byte chunk holds two sub-blocks: its low nibbles, then its high nibbles
        codes = _nibbles(quants.reshape(-1, 4, 32)).reshape(-1, 8, 32).short()
        if qtype == _Q.Q5_K:  # bit j of high byte l is the fifth bit of value l in sub-block j
            shifts = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
            codes = codes | (((blocks[:, 16:48].unsqueeze(1) >> shifts) & 1).short() << 4)
        return codes.reshape(-1, 256), scales, -mins
    raise ValueError(f"GGUF type {qtype.name} has no int4-plane form")


_LOW_LANES, _HIGH_LANES = 0x000F000F000F000F, 0x00F000F000F000F0


def _swar_pairs(nibble_bytes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunks [..., L] of ggml nibble bytes (byte j: value j in the low nibble, value L + j in the high one) ->
    (bytes [..., L / 2] of the pairs of values 0..L-1 in order, the same of values L..2L-1), a pair's first value in
    its low nibble. Works on 64-bit words of four 16-bit lanes (bytes 2i, 2i + 1): elementwise uint8 ops over
    strided halves of a block are ~100x slower in torch."""
    words = nibble_bytes.contiguous().view(torch.int64)
    low = (words & _LOW_LANES) | ((words >> 4) & _HIGH_LANES)  # lane i: (b[2i] & 15) | (b[2i + 1] & 15) << 4
    high = ((words >> 4) & _LOW_LANES) | ((words >> 8) & _HIGH_LANES)  # lane i: b[2i] >> 4 | (b[2i + 1] >> 4) << 4
    as_bytes = [lanes.view(torch.int16).to(torch.uint8) for lanes in (low, high)]  # every lane is < 256
    return as_bytes[0], as_bytes[1]


def _pairs(nibble_bytes: torch.Tensor) -> torch.Tensor:
    """[..., L] ggml nibble bytes -> [..., L] bytes of value pairs in order (byte i: value 2i low, 2i + 1 high).
    lmforge's CPU kernels do it in one pass where they are built (the same bytes: tests/weights/test_gguf_pack.py)."""
    fast = cpu_kernels.ggml_pairs(nibble_bytes)
    return fast if fast is not None else torch.cat(_swar_pairs(nibble_bytes), dim=-1)


def _split_pairs(nibble_bytes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """_swar_pairs' two halves, from _pairs (one pass in C where the CPU kernels are built)."""
    half = nibble_bytes.shape[-1] // 2
    pairs = _pairs(nibble_bytes)
    return pairs[..., :half], pairs[..., half:]


def int4_planes(
    raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stored bytes of an [N, K] tensor -> (codes uint8 [N, P * K / 2], two 4-bit codes per byte, low nibble
    first; scales and mins float32 [N, P * K / 32]) with W = sum over the P planes of codes * scales + mins
    (groups of 32 along each plane's K)."""
    qtype = _Q(ggml_type)
    n, k = shape
    blocks = raw.view(-1, GGML_QUANT_SIZES[qtype][1])
    if qtype in (_Q.Q4_0, _Q.Q4_1, _Q.Q4_K, _Q.Q8_0):  # straight from the bytes
        if qtype == _Q.Q4_K:
            scales, mins = (t.squeeze(-1) for t in _k_scales(blocks))
            pairs, mins = _pairs(blocks[:, 16:144].reshape(-1, 4, 32)), -mins
        elif qtype == _Q.Q8_0:  # plane 0: v & 15; plane 1: (v >> 4) + 8, which is the byte's high nibble ^ 8
            scales = _half(blocks, 0)
            low, high = _split_pairs(blocks[:, 2:34])  # ggml order is irrelevant here: one byte per value
            low, high = low.reshape(n, k // 2), (high ^ 0x88).reshape(n, k // 2)
            s = scales.reshape(n, k // GROUP)
            return (
                torch.cat([low, high], dim=1),
                torch.cat([s, 16 * s], 1),
                torch.cat([torch.zeros_like(s), -128 * s], 1),
            )
        else:
            start = 2 if qtype == _Q.Q4_0 else 4
            scales = _half(blocks, 0)
            mins = -8 * scales if qtype == _Q.Q4_0 else _half(blocks, 2)
            pairs = _pairs(blocks[:, start : start + 16])
        return pairs.reshape(n, k // 2), scales.reshape(n, k // GROUP), mins.reshape(n, k // GROUP)
    codes, scales, mins = _codes(blocks, qtype)
    codes = codes.reshape(n, k)
    scales, mins = scales.reshape(n, k // GROUP), mins.reshape(n, k // GROUP)
    low, high = (codes & 15).to(torch.uint8), ((codes >> 4) + 8).to(torch.uint8)
    return (
        torch.cat([_pack_pairs(low), _pack_pairs(high)], dim=1),
        torch.cat([scales, 16 * scales], dim=1),
        torch.cat([mins, -128 * scales], dim=1),
    )


def _pack_pairs(codes: torch.Tensor) -> torch.Tensor:
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_pairs(pairs: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] of two codes per byte -> uint8 [N, K] codes (for tests and the reference)."""
    return torch.stack([pairs & 15, pairs >> 4], dim=-1).flatten(-2)


def pack_gptq_order(pairs: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] of two codes per byte -> int32 [K / 8, N], code k of a column at bits 4 * (k % 8) of word
    k // 8 (GPTQ's qweight order, the canonical wna16 form): four bytes per little-endian word."""
    return pairs.contiguous().view(torch.int32).t().contiguous()
