"""Bit packing of integer codes into int32 words, in the layouts of the AutoAWQ "gemm" and GPTQ (v1) formats.

GPTQ packs along K: word (k // p, n) holds element k at bits b * (k % p) (p = 32 // b codes a word). Its
qzeros pack along N and store zero - 1 (AutoGPTQ's v1 convention; readers add the 1 back). AWQ packs along N,
eight 4-bit codes a word in the order [0, 2, 4, 6, 1, 3, 5, 7]: nibble i holds column AWQ_ORDER[i] of the
word's eight, for qweight and qzeros alike, and stores the zero itself.
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2**32) -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] codes -> [R // p, C] int32: row r goes to word r // p at bits * (r % p)."""
    p = 32 // bits
    r, c = q.shape
    if r % p:
        raise ValueError(f"cannot pack {r} rows {p} to a word")
    parts = q.to(torch.int64).reshape(r // p, p, c) & (2**bits - 1)
    shifts = (torch.arange(p, dtype=torch.int64, device=q.device) * bits).view(1, p, 1)
    return _to_int32((parts << shifts).sum(dim=1))


def pack_cols(q: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """[R, C] codes -> [R, C // p] int32: slot i of word j holds column j * p + order[i] (order: identity)."""
    p = 32 // bits
    r, c = q.shape
    if c % p:
        raise ValueError(f"cannot pack {c} columns {p} to a word")
    parts = q.to(torch.int64).reshape(r, c // p, p) & (2**bits - 1)
    if order is not None:
        parts = parts[:, :, list(order)]
    shifts = (torch.arange(p, dtype=torch.int64, device=q.device) * bits).view(1, 1, p)
    return _to_int32((parts << shifts).sum(dim=2))


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_rows: [R // p, C] int32 -> [R, C] int32 codes."""
    p = 32 // bits
    shifts = (torch.arange(p, dtype=torch.int32, device=words.device) * bits).view(1, p, 1)
    codes = (words.unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(-1, words.shape[1])


def unpack_cols(words: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of pack_cols: [R, C // p] int32 -> [R, C] int32 codes."""
    p = 32 // bits
    shifts = (torch.arange(p, dtype=torch.int32, device=words.device) * bits).view(1, 1, p)
    codes = (words.unsqueeze(2) >> shifts) & (2**bits - 1)
    if order is not None:
        inverse = [order.index(i) for i in range(p)]
        codes = codes[:, :, inverse]
    return codes.reshape(words.shape[0], -1)
