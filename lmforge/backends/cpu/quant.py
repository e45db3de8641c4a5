"""Quantized linear ops in plain torch: the reference the CUDA kernels are tested against (QUANT_CONTRACT.md).

Each scheme is a pair: `<scheme>_prepare(...) -> dict` runs once per layer after loading, `<scheme>_linear(x,
prepared, bias)` per forward. The reference path dequantizes the weight once at prepare (the matmul then runs in
x's dtype; in fp32 for FP8 and as exact integer products for int8, whose activation quantization it reproduces),
and `dequantize_<scheme>` gives the fp32 weight [N, K] from the canonical tensors for tests.

Fast paths on CPU tensors, which agree with the reference (tests/quant/test_cpu_ops.py): int4 weights with N a
multiple of 16 and a group of 32/64/128/256 stay packed in torch's `_weight_int4pack_mm_for_cpu` layout (a
quarter of bf16's memory; GGUF layers, prepared with compute_dtype bf16 in a float32 model, run it on bf16
activations, within bf16 rounding of the reference: tests/weights/test_gguf_pack.py); int8 W8A8 multiplies with
`torch._int_mm`. `reference=True` in prepare forces the reference path.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from lmforge.kernels import cpu as cpu_kernels
from lmforge.nn.quant.packing import unpack_int32

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
_MIN_SCALE = 1e-12


def dequantize_wna16(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    mins: torch.Tensor | None = None,
    planes: int = 1,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """qweight int32 [P * K / (32 / bits), N], scales / zeros (or mins) [P * K / G, N] -> W float32 [N, K].

    w = (q - zeros) * scales, or q * scales + mins (GGUF's form); with P planes the K axis holds P codes per weight
    and W is their sum (lmforge/weights/gguf_pack.py). compute_dtype only matters to the fast path."""
    q = unpack_int32(qweight, bits, dim=0).float()  # [P * K, N]
    groups = torch.arange(q.shape[0], device=q.device) // group_size
    if mins is None:
        w = (q - zeros.float()[groups]) * scales.float()[groups]
    else:
        w = q * scales.float()[groups] + mins.float()[groups]
    return w.unflatten(0, (planes, -1)).sum(0).t().contiguous()


def _int4pack_prepare(qweight, scales, zeros, mins, group_size: int, planes: int, compute_dtype) -> dict | None:
    """torch's packed int4 CPU matmul: w = (q - 8) * scale + offset per group, so offset = (8 - zero) * scale, or
    8 * scale + min. Its float32-activation kernel is ~10x slower than a dense float32 matmul on x86 (torch 2.13)
    while its bf16 one is 2-10x faster at batch 1: compute_dtype bf16 runs it on bf16 activations (and bf16
    scales and offsets) for float32 models."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if qweight.device.type != "cpu" or n % 16 or group_size not in (32, 64, 128, 256) or k % group_size:
        return None
    convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if convert is None:
        return None
    # [N, K] values in [0, 16): the words' bytes hold two codes each, low nibble first
    pairs = qweight.t().contiguous().view(torch.uint8)
    q_nk = torch.stack([pairs & 15, pairs >> 4], dim=-1).view(n, k).to(torch.int32)
    scales = scales.float()
    offsets = 8 * scales + mins.float() if mins is not None else (8 - zeros.float()) * scales
    scales_and_zeros = torch.stack([scales, offsets], dim=-1)  # [K/G, N, 2]
    if compute_dtype is not None:
        scales_and_zeros = scales_and_zeros.to(compute_dtype)
    return {
        "int4pack": convert(q_nk, 1),
        "scales_and_zeros": scales_and_zeros,
        "group_size": group_size,
        "n": n,
        "planes": planes,
        "compute_dtype": compute_dtype,
    }


def wna16_prepare(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    mins: torch.Tensor | None = None,
    planes: int = 1,
    compute_dtype: torch.dtype | None = None,
    reference: bool = False,
) -> dict:
    if bits not in (4, 8):
        raise ValueError(f"wna16 supports 4 and 8 bit weights, not {bits}")
    if (zeros is None) == (mins is None):
        raise ValueError("wna16 takes exactly one of zeros (w = (q - z) * s) and mins (w = q * s + m)")
    k, n = qweight.shape[0] * (32 // bits), qweight.shape[1]
    offsets = zeros if mins is None else mins
    if k % planes or k % group_size or scales.shape != (k // group_size, n) or offsets.shape != scales.shape:
        raise ValueError(
            f"wna16: qweight {tuple(qweight.shape)} ({bits} bit, {planes} plane(s)) with group {group_size} needs "
            f"scales and zeros [{k // max(group_size, 1)}, {n}], got {tuple(scales.shape)} and {tuple(offsets.shape)}"
        )
    if bits == 4 and not reference:
        # float32 activations (GGUF in a float32 model asks for bf16 compute; AWQ/GPTQ scales come in the model's
        # dtype): lmforge's own kernel, exact in float32; else torch's packed int4 matmul on bf16 activations
        f32_model = compute_dtype is None and mins is None and scales.dtype == torch.float32
        if compute_dtype == torch.bfloat16 or f32_model:
            # GGUF's types (mins) may run on int8 activations as llama.cpp runs them, when asked (off by default:
            # cpu_kernels.INT8_ACTIVATIONS_ENV); the W4A16 formats (zeros: GPTQ, AWQ, ...) always keep float32 ones
            int8 = mins is not None and os.environ.get(cpu_kernels.INT8_ACTIVATIONS_ENV) == "1"
            q4 = cpu_kernels.q4_prepare(
                qweight, scales, offsets, group_size, planes, zeros=mins is None, int8_activations=int8
            )
            if q4 is not None:
                return q4
        fast = _int4pack_prepare(qweight, scales, zeros, mins, group_size, planes, compute_dtype)
        if fast is not None:
            return fast
    weight = dequantize_wna16(qweight, scales, zeros, bits, group_size, mins, planes)
    return {"weight": weight.to(scales.dtype)}


def wna16_linear(x: torch.Tensor, prepared: dict, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype."""
    if "q4" in prepared:
        y = cpu_kernels.q4_linear(x, prepared, bias)
        if y is None:  # not float32 activations
            w = cpu_kernels.q4_dequantize(prepared).to(x.dtype)
            y = F.linear(x, w, None if bias is None else bias.to(x.dtype))
        return y
    if "int4pack" in prepared:
        compute = prepared["compute_dtype"] or x.dtype
        xc = x.to(compute) if x.dtype != compute else x.contiguous()
        if prepared["planes"] > 1:  # the planes' codes sit one after the other along K
            xc = xc.repeat(1, prepared["planes"])
        scales_and_zeros = prepared["scales_and_zeros"]
        if scales_and_zeros.dtype != compute:
            scales_and_zeros = scales_and_zeros.to(compute)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            xc, prepared["int4pack"], prepared["group_size"], scales_and_zeros
        )
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if bias is None else y + bias.to(x.dtype)
    w = prepared["weight"]
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _expand_block_scale(scale: torch.Tensor, n: int, k: int, block_size: tuple[int, int] | None) -> torch.Tensor:
    """Any of the contract's scale shapes -> something that broadcasts against [N, K]."""
    scale = scale.float()
    if block_size is None:
        return scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(1, 1)
    bn, bk = block_size
    return scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]


def dequantize_fp8(
    weight: torch.Tensor, weight_scale: torch.Tensor, block_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """weight float8_e4m3fn [N, K] with a per-tensor, per-channel [N, 1] or block scale -> float32 [N, K]."""
    n, k = weight.shape
    return weight.float() * _expand_block_scale(weight_scale, n, k, block_size)


def quantize_fp8_activation(
    x: torch.Tensor, input_scale: torch.Tensor | None, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scale broadcastable to it): static per-tensor when input_scale is given,
    else dynamic per token (group_size None) or per token and `group_size` channels (block FP8)."""
    xf = x.float()
    if input_scale is not None:
        scale = input_scale.float().reshape(1, 1)
    elif group_size is None:
        scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    else:
        m, k = xf.shape
        pad = (-k) % group_size
        xg = F.pad(xf, (0, pad)).view(m, -1, group_size)
        scale = (xg.abs().amax(dim=-1) / FP8_MAX).clamp(min=_MIN_SCALE).repeat_interleave(group_size, 1)[:, :k]
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def fp8_prepare(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    block_size: tuple[int, int] | None = None,
) -> dict:
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        raise ValueError(f"fp8 weight must be float8_e4m3fn [N, K], got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    if block_size is not None:
        bn, bk = block_size
        want = (-(-n // bn), -(-k // bk))
        if tuple(weight_scale.shape) != want:
            raise ValueError(f"fp8 block scale for weight [{n}, {k}] and block {block_size} must be {want}")
        if input_scale is not None:
            raise ValueError("block FP8 quantizes activations dynamically; a static input_scale is not supported")
    elif weight_scale.numel() not in (1, n):
        raise ValueError(
            f"fp8 weight scale must be per-tensor or per-channel [{n}, 1], got {tuple(weight_scale.shape)}"
        )
    return {
        "weight": dequantize_fp8(weight, weight_scale, block_size),  # fp32: e4m3 x scale is exact there
        "input_scale": None if input_scale is None else input_scale.float().reshape(1),
        "group_size": None if block_size is None else block_size[1],
    }


def fp8_linear(x: torch.Tensor, prepared: dict, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Activation quantized to e4m3 (static, per token, or per token and group), product in fp32, out in x's dtype."""
    q, scale = quantize_fp8_activation(x, prepared["input_scale"], prepared["group_size"])
    y = F.linear(q.float() * scale, prepared["weight"])
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def dequantize_int8(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    return weight.float() * weight_scale.float().reshape(-1, 1)


def quantize_int8_activation(
    x: torch.Tensor, input_scale: torch.Tensor | None, input_zero_point: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [M, K] -> (int8 values, float32 scale [M, 1] or [1, 1], zero point or None): dynamic symmetric per token
    when input_scale is None, else static (asymmetric with a zero point)."""
    xf = x.float()
    if input_scale is None:
        scale = (xf.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=_MIN_SCALE)
        zp = None
    else:
        scale = input_scale.float().reshape(1, 1)
        zp = None if input_zero_point is None else input_zero_point.float().reshape(1, 1)
    q = torch.round(xf / scale)
    if zp is not None:
        q = q + zp
    return q.clamp(-128, 127).to(torch.int8), scale, zp


def int8_prepare(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    input_zero_point: torch.Tensor | None = None,
    reference: bool = False,
) -> dict:
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"int8 weight must be int8 [N, K], got {weight.dtype} {tuple(weight.shape)}")
    n = weight.shape[0]
    if weight_scale.numel() not in (1, n):
        raise ValueError(f"int8 weight scale must be [{n}, 1] or [1], got {tuple(weight_scale.shape)}")
    fast = weight.device.type == "cpu" and not reference and hasattr(torch, "_int_mm")
    return {
        "weight": None if fast else weight.contiguous(),
        "weight_t": weight.t().contiguous() if fast else None,  # _int_mm's [K, N]
        "int_mm": fast,
        "weight_scale": weight_scale.float().reshape(1, -1),  # [1, N] or [1, 1], multiplies the output columns
        "input_scale": None if input_scale is None else input_scale.float().reshape(1),
        "input_zero_point": None if input_zero_point is None else input_zero_point.float().reshape(1),
        "weight_row_sums": weight.double().sum(dim=1),  # for the asymmetric zero point
    }


def int8_linear(x: torch.Tensor, prepared: dict, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Exact integer product (torch._int_mm's int32, or float64 in the reference path, which holds every such
    sum exactly), then * x_scale * w_scale in fp32."""
    q, scale, zp = quantize_int8_activation(x, prepared["input_scale"], prepared["input_zero_point"])
    if prepared["int_mm"]:
        acc = torch._int_mm(q, prepared["weight_t"]).double()
    else:
        acc = q.double() @ prepared["weight"].double().t()
    if zp is not None:  # (q - zp) @ W^T = q @ W^T - zp * rowsum(W)
        acc = acc - zp.double() * prepared["weight_row_sums"]
    y = acc.float() * scale * prepared["weight_scale"]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


_LINEAR = {"wna16": wna16_linear, "fp8": fp8_linear, "int8": int8_linear}


def fused_moe_quantized_prepare(gate_up: list[dict], down: list[dict], scheme: str) -> dict:
    """The experts of one MoE layer from each expert's `<scheme>_prepare` output ([2I, H] gate_up and [H, I] down
    weights), once after loading; the reference keeps the per-expert lists."""
    if scheme not in _LINEAR:
        raise ValueError(f"unknown quantization scheme {scheme!r} for fused_moe_quantized; known: {sorted(_LINEAR)}")
    if len(gate_up) != len(down) or not gate_up:
        raise ValueError(f"{len(gate_up)} gate_up experts but {len(down)} down experts")
    return {"scheme": scheme, "gate_up": gate_up, "down": down}


def fused_moe_quantized(
    hidden_states: torch.Tensor,
    experts: dict,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """fused_moe over quantized experts (`fused_moe_quantized_prepare`'s output): each routed group of tokens runs
    through `<scheme>_linear` of its expert's gate_up, the activation, and its down."""
    from .moe import _act_and_mul

    gate_up, down, linear = experts["gate_up"], experts["down"], _LINEAR[experts["scheme"]]
    top_k = topk_ids.shape[1]
    out = torch.zeros_like(hidden_states)
    flat_ids = topk_ids.reshape(-1)
    order = flat_ids.argsort(stable=True)
    counts = torch.bincount(flat_ids, minlength=len(gate_up)).tolist()
    token_of_slot, weight_of_slot = order // top_k, topk_weights.reshape(-1)[order]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tokens = token_of_slot[start : start + n]
        h = linear(_act_and_mul(linear(hidden_states[tokens], gate_up[e]), activation), down[e])
        out.index_add_(0, tokens, (h * weight_of_slot[start : start + n, None]).to(out.dtype))
        start += n
    return out
