"""Fused mixture-of-experts: every token through its top-k gated-MLP experts, outputs summed with the routing weights.

The T * top_k (token, slot) pairs are sorted by expert and each expert's run is padded to a multiple of BLOCK_M,
so every BLOCK_M tile of rows belongs to one expert. Two grouped GEMMs then run over those tiles:
  1. inter = act(x @ gate^T) * (x @ up^T)  (gate and up share the x tile; the activation is fused in)
  2. out_slot = routing_weight * (inter @ down^T), one row per (token, slot), summed over the slots afterwards.
The routing bookkeeping is torch ops sized by the static bound T * top_k + min(T * top_k, E) * (BLOCK_M - 1) and
never reads a value on the host, so the whole op can be recorded in a CUDA graph. Tiles past the used length
find the sentinel slot id and return at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dot_precision, stable_cache_keys, tanh

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


@triton.jit
def _tile_rows(sorted_ids_ptr, topk_ids_ptr, num_slots, m_block, BLOCK_M: tl.constexpr):
    """(row positions, slot ids, valid rows, expert) of one tile; expert -1 when the tile is padding only."""
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_ids_ptr + rows)
    first = tl.load(sorted_ids_ptr + m_block * BLOCK_M)
    # an expert's tiles always start with a real slot (padding only fills its last tile), so the first row names it
    expert = tl.load(topk_ids_ptr + tl.minimum(first, num_slots - 1)).to(tl.int64)
    expert = tl.where(first < num_slots, expert, -1)
    return rows, slots, slots < num_slots, expert


@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Programs walk GROUP_M row tiles for each column tile, so tiles of the same expert reuse weights from L2."""
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    m_block = first_m + (pid % per_group) % group_m
    n_block = (pid % per_group) // group_m
    return m_block, n_block


@triton.jit
def _moe_gate_up_kernel(
    x_ptr,
    w_ptr,
    inter_ptr,
    sorted_ids_ptr,
    topk_ids_ptr,
    num_slots,
    top_k,
    hidden,
    inter_size,
    num_m,
    stride_xt,
    stride_xh,
    stride_we,
    stride_wn,
    stride_wk,
    stride_it,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    m_block, n_block = _swizzle(tl.program_id(0), num_m, tl.cdiv(inter_size, BLOCK_N), GROUP_M)
    rows, slots, valid, expert = _tile_rows(sorted_ids_ptr, topk_ids_ptr, num_slots, m_block, BLOCK_M)
    if expert < 0:
        return
    tokens = tl.where(valid, slots // top_k, 0).to(tl.int64)
    n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < inter_size
    k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + k[None, :] * stride_xh
    # [BLOCK_K, BLOCK_N] views of the gate rows n and the up rows inter_size + n of this expert
    g_ptrs = w_ptr + expert * stride_we + n[None, :] * stride_wn + k[:, None] * stride_wk
    u_ptrs = g_ptrs + inter_size * stride_wn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=valid[:, None], other=0.0)
            g = tl.load(g_ptrs, mask=n_mask[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = (k0 + k) < hidden
            x = tl.load(x_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
            u = tl.load(u_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        acc_g = tl.dot(x, g.to(x.dtype), acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(x, u.to(x.dtype), acc_u, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xh
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    if ACT == "silu":
        act = acc_g / (1.0 + tl.exp(-acc_g))
    elif ACT == "gelu":
        act = 0.5 * acc_g * (1.0 + tl.math.erf(acc_g * 0.7071067811865476))
    else:  # tanh approximation, sqrt(2 / pi) = 0.7978845608028654
        act = 0.5 * acc_g * (1.0 + tanh(0.7978845608028654 * (acc_g + 0.044715 * acc_g * acc_g * acc_g)))
    out_ptrs = inter_ptr + rows.to(tl.int64)[:, None] * stride_it + n[None, :]
    tl.store(out_ptrs, (act * acc_u).to(inter_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


@triton.jit
def _moe_down_kernel(
    inter_ptr,
    w_ptr,
    out_ptr,
    sorted_ids_ptr,
    topk_ids_ptr,
    topk_weights_ptr,
    num_slots,
    hidden,
    inter_size,
    num_m,
    stride_it,
    stride_we,
    stride_wn,
    stride_wk,
    stride_ot,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    m_block, n_block = _swizzle(tl.program_id(0), num_m, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    rows, slots, valid, expert = _tile_rows(sorted_ids_ptr, topk_ids_ptr, num_slots, m_block, BLOCK_M)
    if expert < 0:
        return
    n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < hidden
    k = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + rows.to(tl.int64)[:, None] * stride_it + k[None, :]
    w_ptrs = w_ptr + expert * stride_we + n[None, :] * stride_wn + k[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, inter_size, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = (k0 + k) < inter_size
            a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    weight = tl.load(topk_weights_ptr + slots, mask=valid, other=0.0).to(tl.float32)
    out = acc * weight[:, None]
    safe_slots = tl.where(valid, slots, 0).to(tl.int64)
    tl.store(
        out_ptr + safe_slots[:, None] * stride_ot + n[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=valid[:, None] & n_mask[None, :],
    )


def _launch_config(num_slots: int, num_experts: int) -> dict:
    """Tile sizes by the mean rows per expert (a shape, so fixed under graph capture): decode-sized batches are
    weight-bandwidth bound and want small BLOCK_M and many programs; prefill is compute bound."""
    rows_per_expert = num_slots / num_experts
    if rows_per_expert <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    if rows_per_expert <= 48:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


# up to this many (token, slot) pairs the routing is sorted by one Triton program (decode batches); beyond it by
# torch ops (about fifteen small kernels, which dominate a decode step's MoE time in a CUDA graph)
ALIGN_ONE_PROGRAM_MAX_SLOTS = 1024


@triton.jit
def _align_kernel(
    topk_ids_ptr,
    sorted_ids_ptr,
    start_ptr,
    num_slots,
    num_experts,
    length,
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CHUNK: tl.constexpr,
    FILL: tl.constexpr,
):
    """One program: sorted_ids[padded_start[e] + rank of slot s among expert e's slots] = s, the rest the sentinel
    num_slots; the same layout as the torch path of align_by_expert (slots of an expert in slot order)."""
    s = tl.arange(0, BLOCK_S)
    s_mask = s < num_slots
    # padding slots go to the extra bin num_experts (< BLOCK_E), which takes no rows
    ids = tl.load(topk_ids_ptr + s, mask=s_mask, other=num_experts).to(tl.int32)
    counts = tl.histogram(ids, BLOCK_E)
    bins = tl.arange(0, BLOCK_E)
    padded = tl.where(bins < num_experts, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    tl.store(start_ptr + bins, tl.cumsum(padded, 0) - padded)
    for i0 in range(0, length, FILL):
        i = i0 + tl.arange(0, FILL)
        tl.store(sorted_ids_ptr + i, tl.full([FILL], 0, tl.int32) + num_slots, mask=i < length)
    # rank of each slot among the earlier slots of its expert
    rank = tl.zeros([BLOCK_S], dtype=tl.int32)
    for j0 in range(0, num_slots, CHUNK):
        j = j0 + tl.arange(0, CHUNK)
        ids_j = tl.load(topk_ids_ptr + j, mask=j < num_slots, other=-1).to(tl.int32)
        same = (ids[:, None] == ids_j[None, :]) & (j[None, :] < s[:, None])
        rank += tl.sum(same.to(tl.int32), axis=1)
    tl.debug_barrier()  # the expert starts and the sentinel fill are visible to every thread of the program
    start = tl.load(start_ptr + ids, mask=s_mask, other=0)
    tl.store(sorted_ids_ptr + start + rank, s, mask=s_mask)


def _aligned_length(num_slots: int, num_experts: int, block_m: int) -> int:
    # at most min(T * k, E) experts get slots, each wasting under block_m rows; whole tiles, so no tile reads past
    return triton.cdiv(num_slots + min(num_slots, num_experts) * (block_m - 1), block_m) * block_m


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> torch.Tensor:
    """topk_ids [T, k] -> sorted_ids int32 of T * k + min(T * k, E) * (block_m - 1) entries rounded up to whole
    tiles: the flat slot ids (t * k + j) grouped by expert, each expert's run padded to a multiple of block_m with
    the sentinel T * k. No host sync. Up to ALIGN_ONE_PROGRAM_MAX_SLOTS slots one Triton program does it."""
    num_slots = topk_ids.numel()
    length = _aligned_length(num_slots, num_experts, block_m)
    if 0 < num_slots <= ALIGN_ONE_PROGRAM_MAX_SLOTS and block_m & (block_m - 1) == 0:
        flat = topk_ids.reshape(-1)
        flat = flat if flat.is_contiguous() else flat.contiguous()
        sorted_ids = torch.empty(length, dtype=torch.int32, device=flat.device)
        block_e = triton.next_power_of_2(num_experts + 1)
        starts = torch.empty(block_e, dtype=torch.int32, device=flat.device)
        block_s = triton.next_power_of_2(num_slots)
        _align_kernel[(1,)](
            flat,
            sorted_ids,
            starts,
            num_slots,
            num_experts,
            length,
            BLOCK_M=block_m,
            BLOCK_S=block_s,
            BLOCK_E=block_e,
            CHUNK=min(64, block_s),
            FILL=1024,
            num_warps=4 if block_s <= 256 else 8,
        )
        return sorted_ids
    return align_by_expert_torch(topk_ids, num_experts, block_m)


def align_by_expert_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> torch.Tensor:
    """align_by_expert in torch ops (any number of slots)."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_slots = flat.numel()
    # scatter_add rather than bincount: bincount reads the max id on the host
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_start = torch.cumsum(padded, 0) - padded
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    experts = flat[order]
    dest = padded_start[experts] + torch.arange(num_slots, device=flat.device) - start[experts]
    length = _aligned_length(num_slots, num_experts, block_m)
    sorted_ids = torch.full((length,), num_slots, dtype=torch.int32, device=flat.device)
    sorted_ids[dest] = order.to(torch.int32)
    return sorted_ids


def fused_moe(
    hidden_states: torch.Tensor,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    config: dict | None = None,
) -> torch.Tensor:
    """hidden_states [T, H], gate_up_weight [E, 2I, H] ([gate; up]), down_weight [E, H, I], topk_weights [T, k]
    (any float dtype), topk_ids [T, k] (int) -> [T, H] in hidden_states' dtype. config overrides the tile heuristic
    (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unsupported MoE activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")
    num_tokens, hidden = hidden_states.shape
    num_experts, two_inter, w_hidden = gate_up_weight.shape
    inter_size = two_inter // 2
    top_k = topk_ids.shape[1] if topk_ids.dim() == 2 else 0
    if w_hidden != hidden or two_inter % 2 or tuple(down_weight.shape) != (num_experts, hidden, inter_size):
        raise ValueError(
            f"weights gate_up {tuple(gate_up_weight.shape)} / down {tuple(down_weight.shape)} "
            f"do not fit hidden_states {tuple(hidden_states.shape)}"
        )
    if tuple(topk_ids.shape) != (num_tokens, top_k) or topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
            f"must both be [{num_tokens}, top_k]"
        )
    num_slots = num_tokens * top_k
    if num_slots == 0:
        return torch.zeros_like(hidden_states)
    if hidden_states.stride(-1) != 1:
        hidden_states = hidden_states.contiguous()
    topk_ids = topk_ids.contiguous()
    topk_weights = topk_weights.contiguous()
    cfg = {**_launch_config(num_slots, num_experts), **(config or {})}
    block_m, block_n, block_k = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    sorted_ids = align_by_expert(topk_ids, num_experts, block_m)
    num_m = sorted_ids.numel() // block_m
    precision = dot_precision(hidden_states.dtype)
    inter = hidden_states.new_empty(num_m * block_m, inter_size)
    _moe_gate_up_kernel[(num_m * triton.cdiv(inter_size, block_n),)](
        hidden_states,
        gate_up_weight,
        inter,
        sorted_ids,
        topk_ids,
        num_slots,
        top_k,
        hidden,
        inter_size,
        num_m,
        *hidden_states.stride(),
        *gate_up_weight.stride(),
        inter.stride(0),
        ACT=activation,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=8,
        EVEN_K=hidden % block_k == 0,
        DOT_PRECISION=precision,
        **launch,
    )
    out_slots = hidden_states.new_empty(num_slots, hidden)
    _moe_down_kernel[(num_m * triton.cdiv(hidden, block_n),)](
        inter,
        down_weight,
        out_slots,
        sorted_ids,
        topk_ids,
        topk_weights,
        num_slots,
        hidden,
        inter_size,
        num_m,
        inter.stride(0),
        *down_weight.stride(),
        out_slots.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=8,
        EVEN_K=inter_size % block_k == 0,
        DOT_PRECISION=precision,
        **launch,
    )
    # torch sums half-precision inputs in float32 and rounds once
    return out_slots.view(num_tokens, top_k, hidden).sum(dim=1)


stable_cache_keys(globals())
