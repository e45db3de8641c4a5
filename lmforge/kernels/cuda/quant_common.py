"""Split-K epilogue shared by the quantized GEMM kernels, and the device buffers it needs.

Decode-shaped GEMMs (a few rows) are bound by weight reads and have too few output tiles to fill the GPU, so the K
loop is split over SPLIT_K programs per tile. Each program writes its fp32 partial tile to a workspace and bumps the
tile's arrival counter; the last one to arrive sums the partials in split order (deterministic), adds the bias,
stores the output and resets the counter to 0, so the counters are zero again for the next launch (and for every
CUDA-graph replay) without a memset. One launch, no atomics on the output, no host sync.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .common import stable_cache_keys

# FP8 x FP8 dots on Hopper: the warpgroup MMA adds its products into an accumulator that keeps only about 14 bits,
# and Triton's sm_90 default (max_num_imprecise_acc 2**30) never moves the partial sum into fp32 within a dot.
# Block-scaled dots are one dot per 128-k scale block, added into an fp32 sum (DeepSeek-V3's promotion interval);
# per-channel dots carry their accumulator over the whole K (mma.sync tiles of <= 16 rows sum in fp32 anyway).
# LMFORGE_FP8_PRECISE_ACCUM=1 (read at import) moves the sum into fp32 after every instruction (16 <= the 32 k of one
# FP8 instruction): fp32-exact sums, at a price (H200, llama-8b qkv block-scaled FP8, benchmarks/quant.py: 300 rows
# 29.4 -> 61.5 us, 2,048 rows 171.8 -> 415.0 us). A batched FP8 Qwen3-MoE prefill with fp32 activations (three
# prompts, 26 rows: 64-row MMA tiles) gives logits 3e-2 - 1.7e-1 off HF's fp32 forward per prompt by default and
# 4e-7 in the precise mode; one prompt (5 rows: mma.sync tiles) is 1e-7 off either way.
# max_num_imprecise_acc for the FP8 dots: None is Triton's default
FP8_ACC = tl.constexpr(16 if os.environ.get("LMFORGE_FP8_PRECISE_ACCUM") == "1" else None)

# arrival counters; a launch uses the first (tiles) of them and leaves them zero, so launches on one stream share them
NUM_LOCKS = 1 << 16
_LOCKS: dict[torch.device, torch.Tensor] = {}


def splitk_locks(device: torch.device) -> torch.Tensor:
    """The zeroed int32 arrival counters of this device. Called by the prepare ops at load time, so that the first
    allocation never falls inside a CUDA-graph capture."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _LOCKS:
        _LOCKS[device] = torch.zeros(NUM_LOCKS, dtype=torch.int32, device=device)
    return _LOCKS[device]


_NUM_SMS: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Multiprocessors of the device (132 on an H200); a fixed guess off-GPU (the interpreter)."""
    if device.type != "cuda":
        return 132
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def splitk_workspace(split_k: int, num_tiles: int, block_m: int, block_n: int, device: torch.device) -> torch.Tensor:
    if split_k == 1:
        return torch.empty(1, dtype=torch.float32, device=device)
    if num_tiles > NUM_LOCKS:
        raise ValueError(f"split-K over {num_tiles} tiles needs more than the {NUM_LOCKS} arrival counters")
    return torch.empty(split_k * num_tiles * block_m * block_n, dtype=torch.float32, device=device)


@triton.jit
def store_tile(
    acc,
    out_ptr,
    bias_ptr,
    ws_ptr,
    lock_ptr,
    rows,
    cols,
    M,
    N,
    stride_om,
    tile,
    num_tiles,
    pid_k,
    SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """acc [BLOCK_M, BLOCK_N] fp32 (already scaled) of output rows x cols: + bias, cast, store; through the split-K
    workspace when SPLIT (the grid's third dimension, the number of K splits, is then > 1)."""
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    if not SPLIT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tile_size = BLOCK_M * BLOCK_N
        tl.store(ws_ptr + (pid_k * num_tiles + tile) * tile_size + local, acc)
        # every thread's partial is written before one thread releases the counter at GPU scope
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        split_k = tl.num_programs(2)
        if arrived == split_k - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(split_k):
                # .cg: read the other programs' partials from L2, never a stale L1 line
                total += tl.load(ws_ptr + (s * num_tiles + tile) * tile_size + local, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock_ptr + tile, 0)


def pick_split_k(
    num_tiles: int, num_k_blocks: int, device: torch.device, min_blocks_per_split: int = 2, waves: float = 3.0
) -> int:
    """Enough programs for about `waves` waves of the GPU, each still looping over a few K blocks."""
    target = int(waves * num_sms(device))
    if num_tiles >= target:
        return 1
    split = min(triton.cdiv(target, num_tiles), max(1, num_k_blocks // min_blocks_per_split), 64)
    # no empty splits: each takes cdiv(num_k_blocks, split) blocks
    per_split = triton.cdiv(num_k_blocks, split)
    return triton.cdiv(num_k_blocks, per_split)


stable_cache_keys(globals())
