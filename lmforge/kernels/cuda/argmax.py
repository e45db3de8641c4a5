"""Row-wise argmax of [rows, n] logits in one launch: the greedy token of a decode step.

torch's reduction gives one row to one thread block, which streams a 49k-128k vocabulary row serially (~13 us for a
49k row on an H200, more than a whole transformer layer of a 1B model at batch 1). Here CHUNK columns go to each
program; each writes its (max, first index) partial, and the last program of the row to arrive (an arrival counter,
reset by that program, as in the split-K GEMMs) combines them. Ties give the first index, as torch.argmax does; a NaN
ranks as +inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import stable_cache_keys
from .quant_common import NUM_LOCKS, splitk_locks

CHUNK = 4096
MAX_CHUNKS = 1024  # rows up to 4M columns


@triton.jit
def _argmax_kernel(
    x_ptr,
    out_ptr,
    part_v_ptr,
    part_i_ptr,
    lock_ptr,
    n,
    stride_x,
    num_chunks,
    CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = cols < n
    v = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=float("-inf")).to(tl.float32)
    v = tl.where(v != v, float("inf"), v)
    best = tl.max(v, axis=0)
    idx = tl.min(tl.where(mask & (v == best), cols, 2147483647), axis=0)
    if num_chunks == 1:
        tl.store(out_ptr + row, idx.to(tl.int64))
    else:
        tl.store(part_v_ptr + row * num_chunks + chunk, best)
        tl.store(part_i_ptr + row * num_chunks + chunk, idx)
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + row, 1, sem="acq_rel", scope="gpu")
        if arrived == num_chunks - 1:
            p = tl.arange(0, BLOCK_P)
            p_mask = p < num_chunks
            # .cg: the other programs' partials from L2, never a stale L1 line
            pv = tl.load(part_v_ptr + row * num_chunks + p, mask=p_mask, other=float("-inf"), cache_modifier=".cg")
            pi = tl.load(part_i_ptr + row * num_chunks + p, mask=p_mask, other=2147483647, cache_modifier=".cg")
            top = tl.max(pv, axis=0)
            tl.store(out_ptr + row, tl.min(tl.where(p_mask & (pv == top), pi, 2147483647), axis=0).to(tl.int64))
            tl.atomic_xchg(lock_ptr + row, 0)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [rows, n] float (any row stride, unit column stride) -> [rows] int64, the first index of each row's max."""
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"argmax_rows: x must be [rows, n > 0], got {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    rows, n = x.shape
    num_chunks = triton.cdiv(n, CHUNK)
    if rows > NUM_LOCKS or num_chunks > MAX_CHUNKS:
        return x.argmax(dim=-1)
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows == 0:
        return out
    part_v = torch.empty(rows * num_chunks, dtype=torch.float32, device=x.device)
    part_i = torch.empty(rows * num_chunks, dtype=torch.int32, device=x.device)
    locks = splitk_locks(x.device) if x.is_cuda else torch.zeros(rows, dtype=torch.int32)
    _argmax_kernel[(rows, num_chunks)](
        x,
        out,
        part_v,
        part_i,
        locks,
        n,
        x.stride(0),
        num_chunks,
        CHUNK=CHUNK,
        BLOCK_P=triton.next_power_of_2(num_chunks),
        num_warps=8,
    )
    return out


stable_cache_keys(globals())
