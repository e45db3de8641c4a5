"""Fused MoE over quantized experts: the grouped GEMMs of fused_moe.py with the experts' weights quantized.

The (token, slot) pairs are sorted by expert and padded to BLOCK_M tiles exactly as the bf16 kernel does
(`align_by_expert`), so each program multiplies one expert's rows by one column block of that expert's weight and
only the routed experts' weights are ever read. The experts are stacked [E, ...] at prepare time. Two launches:
  1. gate_up: inter = act(x @ gate^T) * (x @ up^T), the activation fused, one row per sorted slot;
  2. down: out_slot = routing_weight * (inter @ down^T), one row per (token, slot), summed over the slots after.
Weight formats (W_MODE), each dequantized inside the K loop:
  - "block": float8_e4m3fn [E, N, K] with fine-grained scales [E, cdiv(N, bn), cdiv(K, bk)] (DeepSeek-V3 / Qwen3
    FP8). BLOCK_K = bk; the activation tile is quantized to e4m3 in registers per row and K block (amax / 448, the
    cpu reference's formula), multiplied e4m3 x e4m3 on the tensor cores and each K step's fp32 product is scaled
    by a_scale[row] * w_scale[n block] before it is accumulated.
  - "row": float8_e4m3fn or int8 [E, N, K] with a scale per output channel [E, N] (per tensor: repeated). The
    activation is either quantized per token beforehand (A_MODE "codes": quant_act.quantize_per_token on x, and
    on the intermediate between the launches) or, with a static per-expert input scale, in registers (A_MODE
    "static"); the fp32 (int32 for int8) accumulator is scaled once at the end.
  - "wna16": int4 / int8 codes in quant_wna16's repacked layout [E, cdiv(K, p * KS) * KS, N] int32 with group
    scales (and zero points) [E, K / G, N] in the activation dtype. A K step (BLOCK_K = p * KS) loads its KS word
    rows once; each of the p bit fields is a [KS, BLOCK_N] weight tile, dequantized ((q - z) * s with its group's
    scale and zero point rows, rounded to the activation dtype like the reference) and multiplied in the activation
    dtype by a KS-deep dot (G is a multiple of KS, so a field lies in one group).
Each launch's tiles are cut to fit shared memory (`fit_shared`: fewer stages, then narrower column blocks).
As in fused_moe.py no value is read on the host and every buffer is sized by shapes, so the op records in a CUDA
graph; tiles past the used length find the sentinel slot and return at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dot_precision, stable_cache_keys, tanh
from .fused_moe import ACTIVATIONS, _swizzle, _tile_rows, align_by_expert
from .quant_act import FP8_MAX, INT8_MAX, _to_codes, quantize_per_token
from .quant_common import FP8_ACC
from .quant_wna16 import KS

W_MODES = ("block", "row", "wna16")
# globals a kernel reads must be constexpr (the GPU compiler refuses plain Python numbers; the interpreter takes them)
_KS = tl.constexpr(KS)
_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def _quantize_tile(a, scale, IS_INT: tl.constexpr):
    """a [BLOCK_M, BLOCK_K] fp32 / scale (broadcastable) -> e4m3 or int8 codes (quant_act's rounding)."""
    if IS_INT:
        codes = _to_codes(a / scale, 0.0, True, 127.0)
    else:
        codes = _to_codes(a / scale, 0.0, False, 448.0)
    return codes


@triton.jit
def _wna16_group(s_ptr, z_ptr, g_idx, n, n_mask, stride_sk, stride_sn, HAS_ZEROS: tl.constexpr, SYM_ZERO: tl.constexpr):
    """Scale and zero point rows [1, BLOCK_N] (fp32) of group g_idx for the columns n."""
    s = tl.load(s_ptr + g_idx * stride_sk + n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_ZEROS:
        z = tl.load(z_ptr + g_idx * stride_sk + n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    else:
        z = tl.full([1, 1], SYM_ZERO, tl.float32)
    return s, z


@triton.jit
def _dequant_field(q, s, z, SHIFT: tl.constexpr, BITS: tl.constexpr):
    """Word tile q [KS, BLOCK_N] -> its bit field at SHIFT as (code - z) * s in fp32 (a [KS, BLOCK_N] weight tile)."""
    codes = ((q >> SHIFT) & ((1 << BITS) - 1)).to(tl.float32)
    return (codes - z) * s


@triton.jit
def _qmoe_kernel(
    a_ptr,
    a_scale_ptr,
    w_ptr,
    ws_ptr,
    wz_ptr,
    out_ptr,
    sorted_ids_ptr,
    topk_ids_ptr,
    topk_weights_ptr,
    num_slots,
    top_k,
    N,
    K,
    num_m,
    num_groups,
    stride_am,
    stride_we,
    stride_wn,
    stride_wk,
    stride_se,
    stride_sn,
    stride_sk,
    stride_om,
    GATED: tl.constexpr,
    ACT: tl.constexpr,
    W_MODE: tl.constexpr,
    A_MODE: tl.constexpr,
    IS_INT: tl.constexpr,
    GROUP_N: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    SCALE_PER_BLOCK: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    SYM_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """GATED: a = x [T, K] (or its codes), rows are tokens slot // top_k, out = inter [R, N], weights [gate; up]
    ([2N, K] per expert, up at rows N..2N). Else: a = inter [R, K] (or its codes), rows are sorted positions, out =
    out_slots [num_slots, N] times the routing weight."""
    m_block, n_block = _swizzle(tl.program_id(0), num_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    rows, slots, valid, expert = _tile_rows(sorted_ids_ptr, topk_ids_ptr, num_slots, m_block, BLOCK_M)
    if expert < 0:
        return
    if GATED:
        a_rows = tl.where(valid, slots // top_k, 0).to(tl.int64)
    else:
        a_rows = rows.to(tl.int64)
    n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    w_base = w_ptr + expert * stride_we
    s_base = ws_ptr + expert * stride_se
    if W_MODE == "wna16":
        # a K block (chunk) of BLOCK_K = P * KS rows is KS word rows: bit field j of word row i holds k = j * KS + i
        # (quant_wna16.repack). Only those KS rows are loaded (one word a column and row, no copy per field, so the
        # pipelined buffers stay KS x BLOCK_N words), and each field is its own KS-deep dot.
        k = tl.arange(0, _KS)
        z_base = wz_ptr + expert * stride_se
    else:
        k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + k[None, :]
    if W_MODE == "wna16":
        g_ptrs = w_base + k[:, None] * stride_wk + n[None, :] * stride_wn
    else:
        g_ptrs = w_base + n[None, :] * stride_wn + k[:, None] * stride_wk
    u_ptrs = g_ptrs + N * stride_wn
    if A_MODE == "static":
        a_static = tl.load(a_scale_ptr + expert).to(tl.float32)
    if IS_INT:
        acc_gi = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        acc_ui = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = kb * BLOCK_K
        if W_MODE == "wna16":
            # words past K (the last chunk's padding) are zero codes: their activations are masked to 0
            qg = tl.load(g_ptrs + kb * (_KS * stride_wk), mask=n_mask[None, :], other=0)
            if GATED:
                qu = tl.load(u_ptrs + kb * (_KS * stride_wk), mask=n_mask[None, :], other=0)
            if SCALE_PER_BLOCK:  # the chunk lies in one group
                g_idx = tl.minimum(k0 // GROUP, num_groups - 1)
                sg, zg = _wna16_group(s_base, z_base, g_idx, n, n_mask, stride_sk, stride_sn, HAS_ZEROS, SYM_ZERO)
                if GATED:
                    su, zu = _wna16_group(
                        s_base, z_base, g_idx, N + n, n_mask, stride_sk, stride_sn, HAS_ZEROS, SYM_ZERO
                    )
            for j in tl.static_range(32 // BITS):
                kj = k0 + j * _KS
                if not SCALE_PER_BLOCK:  # GROUP is a multiple of KS (_launch checks): the field lies in one group
                    g_idx = tl.minimum(kj // GROUP, num_groups - 1)
                    sg, zg = _wna16_group(s_base, z_base, g_idx, n, n_mask, stride_sk, stride_sn, HAS_ZEROS, SYM_ZERO)
                    if GATED:
                        su, zu = _wna16_group(
                            s_base, z_base, g_idx, N + n, n_mask, stride_sk, stride_sn, HAS_ZEROS, SYM_ZERO
                        )
                if EVEN_K:
                    a = tl.load(a_ptrs + kj, mask=valid[:, None], other=0.0)
                else:
                    a = tl.load(a_ptrs + kj, mask=valid[:, None] & (kj + k < K)[None, :], other=0.0)
                # dequantized in fp32, rounded to the activation dtype like the reference's weight
                wg = _dequant_field(qg, sg, zg, j * BITS, BITS).to(a.dtype)
                acc_g = tl.dot(a, wg, acc_g, input_precision=DOT_PRECISION)
                if GATED:
                    wu = _dequant_field(qu, su, zu, j * BITS, BITS).to(a.dtype)
                    acc_u = tl.dot(a, wu, acc_u, input_precision=DOT_PRECISION)
        else:
            if EVEN_K:
                a = tl.load(a_ptrs + k0, mask=valid[:, None], other=0.0)
            else:
                a = tl.load(a_ptrs + k0, mask=valid[:, None] & (k0 + k < K)[None, :], other=0.0)
            # ---- the activation operand
            if A_MODE == "group":
                af = a.to(tl.float32)
                a_s = tl.maximum(tl.max(tl.abs(af), axis=1) / _FP8_MAX, 1e-12)
                a_op = _quantize_tile(af, a_s[:, None], False)
            elif A_MODE == "static":
                a_op = _quantize_tile(a.to(tl.float32), a_static, IS_INT)
            else:  # "codes" (already quantized) or "float" (weight-only)
                a_op = a
            # ---- the weight tiles and their product
            if EVEN_K:
                wg = tl.load(g_ptrs + k0 * stride_wk, mask=n_mask[None, :], other=0.0)
            else:
                wg = tl.load(g_ptrs + k0 * stride_wk, mask=n_mask[None, :] & (k0 + k < K)[:, None], other=0.0)
            if GATED:
                if EVEN_K:
                    wu = tl.load(u_ptrs + k0 * stride_wk, mask=n_mask[None, :], other=0.0)
                else:
                    wu = tl.load(u_ptrs + k0 * stride_wk, mask=n_mask[None, :] & (k0 + k < K)[:, None], other=0.0)
            if W_MODE == "block":
                bsg = tl.load(s_base + (n // GROUP_N) * stride_sn + kb * stride_sk, mask=n_mask, other=0.0)
                acc_g += tl.dot(a_op, wg, max_num_imprecise_acc=FP8_ACC) * (a_s[:, None] * bsg[None, :])
                if GATED:
                    bsu = tl.load(s_base + ((N + n) // GROUP_N) * stride_sn + kb * stride_sk, mask=n_mask, other=0.0)
                    acc_u += tl.dot(a_op, wu, max_num_imprecise_acc=FP8_ACC) * (a_s[:, None] * bsu[None, :])
            elif IS_INT:
                acc_gi = tl.dot(a_op, wg, acc_gi, out_dtype=tl.int32)
                if GATED:
                    acc_ui = tl.dot(a_op, wu, acc_ui, out_dtype=tl.int32)
            elif A_MODE == "float":  # weight-only: a float dot
                acc_g = tl.dot(a_op, wg, acc_g)
                if GATED:
                    acc_u = tl.dot(a_op, wu, acc_u)
            else:  # FP8 codes
                acc_g = tl.dot(a_op, wg, acc_g, max_num_imprecise_acc=FP8_ACC)
                if GATED:
                    acc_u = tl.dot(a_op, wu, acc_u, max_num_imprecise_acc=FP8_ACC)
    if W_MODE == "row":
        # per-channel weight scale times the per-token (codes) or per-expert (static) activation scale
        if IS_INT:
            acc_g = acc_gi.to(tl.float32)
            acc_u = acc_ui.to(tl.float32)
        if A_MODE == "static":
            row_s = tl.full([BLOCK_M], 1.0, tl.float32) * a_static
        else:
            row_s = tl.load(a_scale_ptr + a_rows, mask=valid, other=0.0)
        wsg = tl.load(s_base + n * stride_sn, mask=n_mask, other=0.0)
        acc_g = acc_g * (row_s[:, None] * wsg[None, :])
        if GATED:
            wsu = tl.load(s_base + (N + n) * stride_sn, mask=n_mask, other=0.0)
            acc_u = acc_u * (row_s[:, None] * wsu[None, :])
    out_dtype = out_ptr.dtype.element_ty
    if GATED:
        # the projections rounded to the activation dtype first, as the reference's gate_up linear returns them
        g = acc_g.to(out_dtype).to(tl.float32)
        u = acc_u.to(out_dtype).to(tl.float32)
        if ACT == "silu":
            act = g / (1.0 + tl.exp(-g))
        elif ACT == "gelu":
            act = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
        else:  # tanh approximation, sqrt(2 / pi) = 0.7978845608028654
            act = 0.5 * g * (1.0 + tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + n[None, :]
        tl.store(out_ptrs, (act * u).to(out_dtype), mask=valid[:, None] & n_mask[None, :])
    else:
        weight = tl.load(topk_weights_ptr + slots, mask=valid, other=0.0).to(tl.float32)
        # rounded to the activation dtype before the routing weight, as the reference's down linear returns it
        out = acc_g.to(out_dtype).to(tl.float32) * weight[:, None]
        safe_slots = tl.where(valid, slots, 0).to(tl.int64)
        tl.store(
            out_ptr + safe_slots[:, None] * stride_om + n[None, :],
            out.to(out_dtype),
            mask=valid[:, None] & n_mask[None, :],
        )


def launch_config(num_slots: int, num_experts: int) -> dict:
    """Tiles by the mean rows per expert (a shape, so fixed under graph capture). BLOCK_K is not chosen here: it is
    each side's scale block (fp8 block), repacked chunk (wna16) or 128. Decode: small row tiles and narrow column
    blocks, so that a handful of routed experts still spread their weight reads over the GPU's multiprocessors."""
    rows_per_expert = num_slots / num_experts
    if rows_per_expert <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=4)
    elif rows_per_expert <= 48:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3)
    return cfg


def _block_k(side: dict) -> int:
    if side["mode"] == "block":
        return side["block"][1]
    if side["mode"] == "wna16":
        return (32 // side["bits"]) * KS
    return 128


# shared memory a launch may take: the H200's limit per block is 232448 bytes (227 KiB); some slack for what the
# estimate leaves out (barriers, the routing tile)
SHARED_BUDGET = 220 * 1024


def shared_estimate(cfg: dict, side: dict, a_bytes: int, gated: bool) -> int:
    """Bytes of shared memory a launch of _qmoe_kernel takes with cfg (BLOCK_M / BLOCK_N / BLOCK_K / num_stages):
    num_stages - 1 pipelined copies of one K step's loads (the activation tile, the weight tiles; wna16: KS word
    rows a side and the group rows), plus the accumulator's layout change and a quantized activation tile. Checked
    against the sm_90 compiles of Triton 3.9 (metadata.shared; the H200's Triton 3.6 reported the same 345088 bytes
    for the old int4 tiles): at or above them for every scheme at the tiles of `launch_config`."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    sides = 2 if gated else 1
    mode = side["mode"]
    if mode == "wna16":
        s_bytes = side["scales"].element_size()
        rows = 1 if side["group_size"] % bk == 0 else 32 // side["bits"]  # group rows per K step
        per_stage = bm * bk * a_bytes + sides * (
            KS * bn * 4 + rows * bn * s_bytes * (2 if side["zeros"] is not None else 1)
        )
    else:
        per_stage = bm * bk * a_bytes + sides * bn * bk * side["weight"].element_size()
    return (cfg["num_stages"] - 1) * per_stage + bm * bn * 4 + bm * bk * 2


def fit_shared(cfg: dict, side: dict, a_bytes: int, gated: bool, budget: int = SHARED_BUDGET) -> dict:
    """cfg with fewer stages (down to 2), then narrower column blocks (down to 32), until `shared_estimate` fits."""
    cfg = dict(cfg)
    while shared_estimate(cfg, side, a_bytes, gated) > budget and cfg["num_stages"] > 2:
        cfg["num_stages"] -= 1
    while shared_estimate(cfg, side, a_bytes, gated) > budget and cfg["BLOCK_N"] > 32:
        cfg["BLOCK_N"] //= 2
    return cfg


def _launch(a, a_scale, side, out, sorted_ids, topk_ids, topk_weights, num_slots, top_k, n, k, gated, act, a_mode, cfg):
    cfg = fit_shared(cfg, side, a.element_size(), gated)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    num_m = sorted_ids.numel() // block_m
    w_mode = side["mode"]
    if w_mode == "wna16":
        w, s = side["qweight"], side["scales"]  # [E, Kr, N2], [E, G, N2]
        stride_w = (w.stride(0), w.stride(2), w.stride(1))  # (expert, n, word row)
        stride_s = (s.stride(0), s.stride(2), s.stride(1))  # (expert, n, group)
        zeros = side["zeros"]
        num_groups = s.shape[1]
        group = side["group_size"]
        if group % KS and group < k:  # a KS-row field of the kernel must lie in one group
            raise ValueError(f"wna16 group size {group} must be a multiple of {KS} (or cover all of K={k})")
    else:
        w, s, zeros = side["weight"], side["scale"], None
        stride_w = (w.stride(0), w.stride(1), w.stride(2))
        if w_mode == "block":
            stride_s = (s.stride(0), s.stride(1), s.stride(2))
        else:  # [E, N2]
            stride_s = (s.stride(0), s.stride(1), 0)
        num_groups, group = 1, 1
    block_k = cfg["BLOCK_K"]
    _qmoe_kernel[(num_m * triton.cdiv(n, block_n),)](
        a,
        a if a_scale is None else a_scale,
        w,
        s,
        s if zeros is None else zeros,
        out,
        sorted_ids,
        topk_ids,
        topk_weights,
        num_slots,
        top_k,
        n,
        k,
        num_m,
        num_groups,
        a.stride(0),
        *stride_w,
        *stride_s,
        out.stride(0),
        GATED=gated,
        ACT=act,
        W_MODE=w_mode,
        A_MODE=a_mode,
        IS_INT=w.dtype == torch.int8,
        GROUP_N=side["block"][0] if w_mode == "block" else 1,
        BITS=side.get("bits", 8),
        GROUP=group,
        SCALE_PER_BLOCK=w_mode == "wna16" and (group % block_k == 0 or group >= k),
        HAS_ZEROS=zeros is not None,
        SYM_ZERO=float(side.get("sym_zero", 0)),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=8,
        EVEN_K=k % block_k == 0,
        DOT_PRECISION=dot_precision(a.dtype) if a.is_floating_point() else "tf32",
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def _activation_operand(h: torch.Tensor, side: dict) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """(a, a_scale, A_MODE) of one launch: what the kernel reads as its left operand."""
    mode = side["mode"]
    if mode == "wna16":
        return h, None, "float"
    if mode == "block":
        return h, None, "group"
    if side["input_scale"] is not None:  # static per-expert scales [E]: quantized in registers
        return h, side["input_scale"], "static"
    codes, scales = quantize_per_token(h, side["weight"].dtype)
    return codes, scales, "codes"


def fused_moe_quantized_grouped(
    hidden_states: torch.Tensor,
    gate_up: dict,
    down: dict,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    config: dict | None = None,
) -> torch.Tensor:
    """hidden_states [T, H]; gate_up / down: the stacked experts of one side each (quant.fused_moe_quantized_prepare
    of the cuda backend: mode "block" / "row" / "wna16" and its tensors, gate_up [E, 2I, H] and down [E, H, I] in
    features); topk_weights / topk_ids [T, k] -> [T, H] in hidden_states' dtype. config overrides the tiles."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unsupported MoE activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")
    num_tokens, hidden = hidden_states.shape
    num_experts, inter_size = gate_up["num_experts"], gate_up["out_features"] // 2
    if gate_up["in_features"] != hidden or down["in_features"] != inter_size or down["out_features"] != hidden:
        raise ValueError(
            f"experts gate_up [{gate_up['out_features']}, {gate_up['in_features']}] / down "
            f"[{down['out_features']}, {down['in_features']}] do not fit hidden_states {tuple(hidden_states.shape)}"
        )
    top_k = topk_ids.shape[1] if topk_ids.dim() == 2 else 0
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
    block_k_up, block_k_down = _block_k(gate_up), _block_k(down)
    cfg = {**launch_config(num_slots, num_experts), **(config or {})}
    block_m = cfg["BLOCK_M"]
    sorted_ids = align_by_expert(topk_ids, num_experts, block_m)
    num_m = sorted_ids.numel() // block_m
    a, a_scale, a_mode = _activation_operand(hidden_states, gate_up)
    inter = hidden_states.new_empty(num_m * block_m, inter_size)
    up_cfg = {**cfg, "BLOCK_K": block_k_up}
    _launch(
        a,
        a_scale,
        gate_up,
        inter,
        sorted_ids,
        topk_ids,
        topk_weights,
        num_slots,
        top_k,
        inter_size,
        hidden,
        True,
        activation,
        a_mode,
        up_cfg,
    )
    a, a_scale, a_mode = _activation_operand(inter, down)
    out_slots = hidden_states.new_empty(num_slots, hidden)
    down_cfg = {**cfg, "BLOCK_K": block_k_down}
    _launch(
        a,
        a_scale,
        down,
        out_slots,
        sorted_ids,
        topk_ids,
        topk_weights,
        num_slots,
        top_k,
        hidden,
        inter_size,
        False,
        activation,
        a_mode,
        down_cfg,
    )
    # torch sums half-precision inputs in float32 and rounds once
    return out_slots.view(num_tokens, top_k, hidden).sum(dim=1)


__all__ = ["W_MODES", "fit_shared", "fused_moe_quantized_grouped", "launch_config", "shared_estimate", "INT8_MAX"]


stable_cache_keys(globals())
