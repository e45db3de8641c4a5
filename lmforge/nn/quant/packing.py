"""Bit packing of low-bit integers into int32 words, the layouts checkpoints use.

Every format here packs `p = 32 // bits` values per word, value i of a word at bits `[bits * i, bits * (i + 1))`,
along one dim: GPTQ's qweight along in-features, GPTQ's qzeros and AWQ's tensors along out-features (AWQ with its
interleaved order on top), compressed-tensors' weight_packed along in-features. Leaf code: torch only.
"""

from __future__ import annotations

import torch

# AutoAWQ's gemm layout: nibble i of a word holds column AWQ_ORDER[i] of its group of 8
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> int32 values in [0, 2**bits), `32 // bits` times longer along `dim`."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    x = packed.movedim(dim, -1).unsqueeze(-1)  # [..., words, 1]
    values = (x >> shifts) & ((1 << bits) - 1)  # arithmetic shift, then mask: sign bits drop out
    return values.flatten(-2).movedim(-1, dim).contiguous()


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int values in [0, 2**bits) -> int32 words along `dim` (its size must be a multiple of 32 // bits)."""
    p = 32 // bits
    v = values.to(torch.int64).movedim(dim, -1)
    if v.shape[-1] % p:
        raise ValueError(f"cannot pack {v.shape[-1]} values of {bits} bits into int32 words of {p}")
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=v.device)
    words = (v.unflatten(-1, (-1, p)) << shifts).sum(-1)  # < 2**32: fits int64, then wraps into int32
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def awq_unpack(packed: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """AutoAWQ gemm qweight / qzeros [rows, N / 8] -> int32 values [rows, N] in natural column order."""
    values = unpack_int32(packed, bits, dim=1).unflatten(1, (-1, 32 // bits))
    inverse = torch.tensor(AWQ_ORDER, device=packed.device).argsort()  # column j sits in nibble inverse[j]
    return values[:, :, inverse].flatten(1)


def awq_pack(values: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Inverse of awq_unpack (for tests and writers)."""
    v = values.unflatten(1, (-1, 32 // bits))[:, :, list(AWQ_ORDER)].flatten(1)
    return pack_int32(v, bits, dim=1)
