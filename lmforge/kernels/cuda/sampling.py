"""One-pass sampling from temperature-scaled logits: the exponential race (a token wins with probability
softmax(logits / T)) as one kernel that reads each logits row once, instead of the divide / softmax / noise /
clamp / divide / argmax passes over [rows, vocab] float32 that the torch ops make.

argmax_i p_i / E_i with E_i ~ Exp(1) i.i.d. draws token i with probability p_i. In log space that is
argmax_i (logits_i / T - log E_i) (the row's log-sum-exp drops out), with E_i = -log U_i from Triton's Philox
stream: counter (row * vocab + i) under one seed a call, the seed drawn on the device from torch's generator (so
torch.manual_seed makes runs repeatable, and nothing syncs with the host).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import stable_cache_keys


@triton.jit
def _race_kernel(logits_ptr, temp_ptr, seed_ptr, out_ptr, vocab, stride_row, stride_temp, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    inv_t = 1.0 / tl.load(temp_ptr + row * stride_temp)
    seed = tl.load(seed_ptr)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    base = logits_ptr + row.to(tl.int64) * stride_row
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        u = tl.rand(seed, row * vocab + cols)
        e = tl.maximum(-tl.log(u), 1e-30)  # u in [0, 1): E = -log U > 0; 0 only by rounding
        score = tl.where(mask, x * inv_t - tl.log(e), float("-inf"))
        better = score > best
        best = tl.where(better, score, best)
        best_idx = tl.where(better, cols, best_idx)
    # lane winners -> row winner (ties: the smallest index)
    m = tl.max(best, 0)
    idx = tl.min(tl.where(best == m, best_idx, 2147483647), 0)
    tl.store(out_ptr + row, idx.to(tl.int64))


def race_sample(logits: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor | None = None) -> torch.Tensor:
    """logits [rows, vocab] (float32/bf16/fp16, last dim contiguous), temperature [rows] (> 0, any stride) ->
    [rows] int64 token ids, each drawn from softmax(logits[r] / temperature[r]). seed: an int64 [1] device
    tensor (default: drawn from torch's generator on the logits' device)."""
    rows, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if temperature.shape != (rows,):
        raise ValueError(f"temperature must be [{rows}], got {tuple(temperature.shape)}")
    if seed is None:
        seed = torch.randint(0, 2**31 - 1, (1,), device=logits.device, dtype=torch.int64)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        _race_kernel[(rows,)](
            logits, temperature, seed, out, vocab, logits.stride(0), temperature.stride(0), BLOCK=1024, num_warps=4
        )
    return out


stable_cache_keys(globals())
