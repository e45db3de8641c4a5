"""Quantized linear ops of the cuda backend: `<scheme>_prepare` once after loading, `<scheme>_linear` per call.

The inputs are the canonical forms of the quantized-linear contract (QUANT_CONTRACT.md, shared with the cpu
reference ops in lmforge.backends.cpu); the `prepared` dicts are private to this file. No `*_linear` reads a value
on the host or allocates by value, so every one of them can be recorded in a CUDA graph.
"""

from __future__ import annotations

import logging
import os

import torch

from lmforge.kernels.cuda.activation import gated_activation
from lmforge.kernels.cuda.quant_act import quantize_per_group_fp8, quantize_per_token
from lmforge.kernels.cuda.quant_common import splitk_locks
from lmforge.kernels.cuda.quant_moe import fused_moe_quantized_grouped
from lmforge.kernels.cuda.quant_scaled_mm import scaled_mm
from lmforge.kernels.cuda.quant_w4dot import w4_dequantize, w4_dot
from lmforge.kernels.cuda.quant_w4gemv import gemv_supported, repack_gemv, w4_gemv
from lmforge.kernels.cuda.quant_wna16 import KS, dequantize, repack, wna16_gemm

# from this many rows a weight-only layer dequantizes its weight once per call and runs a dense cuBLAS GEMM: the
# fused kernel re-dequantizes each weight tile for every row tile and its dots are small; measured on an H200 it
# already loses at 64 rows (llama-8b projections, benchmarks/quant.py)
WNA16_DENSE_MIN_M = 48
# 4-bit weights whose groups are whole 128-k tiles (group 128 / 256 / per channel, K a multiple of 128; TP shards
# included) may take the column-major layout of quant_w4gemv (`_w4_choice`: opt-in through LMFORGE_W4_KERNEL, not
# yet measured end to end): up to W4_GEMV_MAX_M rows its CUDA-core GEMV (fp32 sums) or its tensor-core dot kernel,
# then the dot kernel up to WNA16_DENSE_MIN_M, then its dequantization + cuBLAS.
W4_GEMV_MAX_M = 1
_W4_CHOICES: dict[tuple, str] = {}
W4_TIMINGS: dict[tuple, dict] = {}  # what the load-time choice measured, per shape (benchmarks report it)
# up to this many rows the per-row x per-column FP8 GEMM runs in the split-K Triton kernel, which streams the weight
# faster than cuBLASLt's row-wise scaled GEMM on decode shapes (H200: 1.3-1.7x at M <= 16, but 2x slower at 64);
# above it torch._scaled_mm
FP8_TRITON_MAX_M = 16
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
logger = logging.getLogger(__name__)


def _rows(x: torch.Tensor, k: int, what: str) -> torch.Tensor:
    if x.shape[-1] != k:
        raise ValueError(f"{what}: x has {x.shape[-1]} input features, the layer {k}")
    return x.reshape(-1, k)


def _time_us(fn, flush: torch.Tensor, reps: int = 8) -> float:
    """Median us of fn with the L2 flushed before each call (weights stream from HBM, as in a model forward)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[reps // 2]


def _w4_choice(qweight: torch.Tensor, scales: torch.Tensor, zeros, sym_zero: int, group: int) -> str:
    """Which kernel a 4-bit weight with whole-tile groups gets, per (K, N, group, dtype, zero points) and device.
    LMFORGE_W4_KERNEL=chunked (the default: the path measured end to end so far), gemv or dot (quant_w4gemv's
    column-major layout with its GEMV or its dot kernel for one row) forces one; auto: on a GPU the first weight of
    each shape times the candidates once (eager, at load, L2 flushed): the w4 layout (its GEMV or dot kernel at one
    row, its dot kernel at 16 rows) against the chunked one (its kernel at 1 and at 16 rows), the smaller sum wins;
    off the GPU (the interpreter) auto means the w4 layout with its GEMV."""
    forced = os.environ.get("LMFORGE_W4_KERNEL", "chunked")
    if forced not in ("auto", "gemv", "dot", "chunked"):
        raise ValueError(f"LMFORGE_W4_KERNEL must be auto, gemv, dot or chunked, got {forced!r}")
    if forced != "auto":
        return forced
    if not qweight.is_cuda or torch.cuda.is_current_stream_capturing():
        return "gemv"
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    key = (k, n, group, scales.dtype, zeros is None, qweight.device)
    if key not in _W4_CHOICES:
        w4, chunked = repack_gemv(qweight), repack(qweight, 4)
        x1 = torch.randn(1, k, device=qweight.device).to(scales.dtype)
        x16 = torch.randn(16, k, device=qweight.device).to(scales.dtype)
        flush = torch.empty(128 << 20, dtype=torch.uint8, device=qweight.device)
        args = (scales, zeros, group)
        t = {
            "gemv": _time_us(lambda: w4_gemv(x1, w4, *args, sym_zero=sym_zero), flush),
            "dot": _time_us(lambda: w4_dot(x1, w4, *args, sym_zero=sym_zero), flush),
            "chunked": _time_us(lambda: wna16_gemm(x1, chunked, scales, zeros, 4, group, sym_zero=sym_zero), flush),
            "dot16": _time_us(lambda: w4_dot(x16, w4, *args, sym_zero=sym_zero), flush),
            "chunked16": _time_us(lambda: wna16_gemm(x16, chunked, scales, zeros, 4, group, sym_zero=sym_zero), flush),
        }
        w4_kernel = "gemv" if t["gemv"] <= t["dot"] else "dot"
        w4_score = t[w4_kernel] + t["dot16"]
        choice = w4_kernel if w4_score <= t["chunked"] + t["chunked16"] else "chunked"
        _W4_CHOICES[key] = choice
        W4_TIMINGS[key] = {name: round(us, 2) for name, us in t.items()}
        logger.info("wna16 %dx%d group %d: %s (us %s)", k, n, group, choice, W4_TIMINGS[key])
        del w4, chunked, flush
    return _W4_CHOICES[key]


def wna16_prepare(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int) -> dict:
    """qweight int32 [K // (32 // bits), N] (GPTQ order), scales / zeros [K // G, N] in the activation dtype, zeros in
    integer units. Repacks the weight for the kernel; all-2**(bits-1) zeros (symmetric) are dropped."""
    if bits not in (4, 8):
        raise ValueError(f"wna16: bits must be 4 or 8, got {bits}")
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"wna16: qweight must be 2-D int32, got {qweight.dtype} {tuple(qweight.shape)}")
    k, n = qweight.shape[0] * (32 // bits), qweight.shape[1]
    group = k if group_size in (-1, 0) or group_size >= k else group_size
    if group <= 0 or k % group:
        raise ValueError(f"wna16: group size {group_size} does not divide in_features {k}")
    if group < k and group % 16:
        raise ValueError(f"wna16: group size {group_size} must be a multiple of 16 for the CUDA kernel")
    if scales.dtype not in ACT_DTYPES or tuple(scales.shape) != (k // group, n):
        raise ValueError(f"wna16: scales must be a float [{k // group}, {n}], got {scales.dtype} {tuple(scales.shape)}")
    if zeros.shape != scales.shape:
        raise ValueError(f"wna16: zeros must be [{k // group}, {n}] like scales, got {tuple(zeros.shape)}")
    sym_zero = 1 << (bits - 1)
    symmetric = bool((zeros == sym_zero).all())
    scales = scales.contiguous()
    zeros = None if symmetric else zeros.to(scales.dtype).contiguous()
    sym_zero = sym_zero if symmetric else 0
    kernel = "chunked"
    if gemv_supported(bits, group, k):
        kernel = _w4_choice(qweight, scales, zeros, sym_zero, group)
    return {
        "layout": "chunked" if kernel == "chunked" else "w4",
        "m1_kernel": kernel,  # chunked, or the w4 layout's kernel for one row: gemv / dot
        "qweight": repack(qweight, bits) if kernel == "chunked" else repack_gemv(qweight),
        "scales": scales,
        "zeros": zeros,
        "sym_zero": sym_zero,
        "bits": bits,
        "group_size": group,
        "in_features": k,
        "out_features": n,
        "locks": splitk_locks(qweight.device),  # allocated at load, never inside a graph capture
    }


def wna16_dequantize(prepared: dict) -> torch.Tensor:
    """W^T [K, N] in the scales' dtype (the dense weight the kernel computes with)."""
    p = prepared
    if p["layout"] == "w4":
        return w4_dequantize(p["qweight"], p["scales"], p["zeros"], p["group_size"], sym_zero=p["sym_zero"])
    return dequantize(
        p["qweight"], p["scales"], p["zeros"], p["bits"], p["group_size"], p["in_features"], sym_zero=p["sym_zero"]
    )


def wna16_linear(x: torch.Tensor, prepared: dict, bias: torch.Tensor | None = None) -> torch.Tensor:
    p = prepared
    k, n = p["in_features"], p["out_features"]
    x2 = _rows(x, k, "wna16_linear")
    if x2.dtype != p["scales"].dtype:
        raise ValueError(f"wna16_linear: x is {x2.dtype} but the layer's scales are {p['scales'].dtype}")
    m = x2.shape[0]
    if m >= WNA16_DENSE_MIN_M:
        w_t = wna16_dequantize(p)
        y = torch.addmm(bias, x2, w_t) if bias is not None else x2 @ w_t
    elif p["layout"] == "w4":
        kernel = w4_gemv if m <= W4_GEMV_MAX_M and p["m1_kernel"] == "gemv" else w4_dot
        y = kernel(x2, p["qweight"], p["scales"], p["zeros"], p["group_size"], bias, sym_zero=p["sym_zero"])
    else:
        y = wna16_gemm(
            x2, p["qweight"], p["scales"], p["zeros"], p["bits"], p["group_size"], bias, sym_zero=p["sym_zero"]
        )
    return y.view(*x.shape[:-1], n)


def _float32(t: torch.Tensor, what: str) -> torch.Tensor:
    if not t.is_floating_point():
        raise ValueError(f"{what} must be a float tensor, got {t.dtype}")
    return t.to(torch.float32)


def fp8_prepare(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    block_size: tuple[int, int] | list[int] | None,
) -> dict:
    """weight float8_e4m3fn [N, K]; weight_scale float32 per tensor ([] / [1]), per channel ([N, 1]) or per block
    ([cdiv(N, bn), cdiv(K, bk)] with block_size (bn, bk)); input_scale float32 [1] (static) or None (dynamic)."""
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        raise ValueError(f"fp8: weight must be 2-D float8_e4m3fn, got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    weight_scale = _float32(weight_scale, "fp8: weight_scale")
    if input_scale is not None:
        input_scale = _float32(input_scale, "fp8: input_scale").reshape(1)
    if block_size is not None:
        bn, bk = (int(v) for v in block_size)
        want = (-(-n // bn), -(-k // bk))
        if tuple(weight_scale.shape) != want:
            raise ValueError(f"fp8: block {bn}x{bk} weight_scale must be {want}, got {tuple(weight_scale.shape)}")
        if input_scale is not None:
            raise ValueError(
                "fp8: block-scaled weights take dynamic per-token-group activation scales, got a static input_scale"
            )
        if bk < 16 or bk & (bk - 1):
            raise ValueError(f"fp8: the K block {bk} must be a power of two >= 16 for the CUDA kernel")
        return {
            "mode": "block",
            "weight": weight.contiguous(),
            "weight_scale": weight_scale.contiguous(),
            "block_size": (bn, bk),
            "locks": splitk_locks(weight.device),
        }
    if weight_scale.numel() == 1:
        per_tensor = True
    elif weight_scale.numel() == n and weight_scale.shape[0] == n:
        per_tensor = False
    else:
        raise ValueError(f"fp8: weight_scale must be [], [1] or [{n}, 1], got {tuple(weight_scale.shape)}")
    w_scale = weight_scale.reshape(-1).expand(n).contiguous()
    return {
        "mode": "tensor" if per_tensor else "channel",
        "weight": weight.contiguous(),
        "w_scale": w_scale,  # [N]
        "w_scale_tensor": weight_scale.reshape(1)[:1].contiguous() if per_tensor else None,
        "input_scale": input_scale,
        # cuBLASLt (torch._scaled_mm) wants K and N in multiples of 16 and reads B column-major: weight.t() is
        "scaled_mm": weight.is_cuda and k % 16 == 0 and n % 16 == 0,
        "locks": splitk_locks(weight.device),
    }


def fp8_linear(x: torch.Tensor, prepared: dict, bias: torch.Tensor | None = None) -> torch.Tensor:
    p = prepared
    n, k = p["weight"].shape
    x2 = _rows(x, k, "fp8_linear")
    if p["mode"] == "block":
        bn, bk = p["block_size"]
        codes, scales = quantize_per_group_fp8(x2, bk)
        y = scaled_mm(codes, p["weight"], scales, p["weight_scale"], x2.dtype, bias, block_size=(bn, bk))
        return y.view(*x.shape[:-1], n)
    codes, scales = quantize_per_token(x2, torch.float8_e4m3fn, p["input_scale"])
    if not p["scaled_mm"] or x2.shape[0] <= FP8_TRITON_MAX_M:
        y = scaled_mm(codes, p["weight"], scales, p["w_scale"], x2.dtype, bias)
    elif p["mode"] == "tensor" and p["input_scale"] is not None:
        # both scales per tensor: cuBLASLt's plain scaled GEMM, any output dtype
        y = torch._scaled_mm(
            codes, p["weight"].t(), scale_a=p["input_scale"], scale_b=p["w_scale_tensor"], bias=bias, out_dtype=x2.dtype
        )
    elif x2.dtype == torch.bfloat16:
        # per-row x per-column scales; cuBLASLt's row-wise mode outputs bf16 only (fp16 takes the Triton kernel)
        y = torch._scaled_mm(
            codes,
            p["weight"].t(),
            scale_a=scales.view(-1, 1),
            scale_b=p["w_scale"].view(1, -1),
            bias=bias,
            out_dtype=torch.bfloat16,
        )
    else:
        y = scaled_mm(codes, p["weight"], scales, p["w_scale"], x2.dtype, bias)
    return y.view(*x.shape[:-1], n)


def int8_prepare(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    input_zero_point: torch.Tensor | None,
) -> dict:
    """weight int8 [N, K] symmetric, weight_scale float32 [N, 1] or [1]; input_scale float32 [1] (static) or None
    (dynamic per token); input_zero_point: an integer [1] for asymmetric static activations, or None."""
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"int8: weight must be 2-D int8, got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    weight_scale = _float32(weight_scale, "int8: weight_scale")
    if weight_scale.numel() not in (1, n) or (weight_scale.numel() == n and weight_scale.shape[0] != n):
        raise ValueError(f"int8: weight_scale must be [1] or [{n}, 1], got {tuple(weight_scale.shape)}")
    if input_scale is not None:
        if input_scale.numel() != 1:
            raise ValueError(f"int8: a static input_scale is one value, got {tuple(input_scale.shape)}")
        input_scale = _float32(input_scale, "int8: input_scale").reshape(1)
    zero_point = 0
    if input_zero_point is not None:
        if input_scale is None or input_zero_point.numel() != 1:
            raise ValueError("int8: input_zero_point needs a static input_scale and must be one value")
        zero_point = int(round(float(input_zero_point.reshape(-1)[0])))  # read once, at load
    return {
        "weight": weight.contiguous(),
        "w_scale": weight_scale.reshape(-1).expand(n).contiguous(),
        "input_scale": input_scale,
        "zero_point": zero_point,
        "w_sum": weight.sum(dim=1, dtype=torch.int32) if zero_point else None,
        "locks": splitk_locks(weight.device),
    }


def int8_linear(x: torch.Tensor, prepared: dict, bias: torch.Tensor | None = None) -> torch.Tensor:
    p = prepared
    n, k = p["weight"].shape
    x2 = _rows(x, k, "int8_linear")
    codes, scales = quantize_per_token(x2, torch.int8, p["input_scale"], p["zero_point"])
    y = scaled_mm(
        codes, p["weight"], scales, p["w_scale"], x2.dtype, bias, zero_point=p["zero_point"], b_sum=p["w_sum"]
    )
    return y.view(*x.shape[:-1], n)


_LINEAR = {"wna16": wna16_linear, "fp8": fp8_linear, "int8": int8_linear}


class _NotGroupable(Exception):
    """Why a layer's experts cannot go through the grouped kernel (they then take the per-expert loop)."""


def _stack(dicts: list[dict], key: str) -> torch.Tensor:
    """torch.stack of one tensor of every expert, each expert's dict then holding a view of its slice (the per-expert
    fallback keeps working and the weights are held once). Experts that already are consecutive slices of one
    contiguous [E, ...] tensor (the layer loads its checkpoint tensors stacked) are viewed as it, not copied."""
    parts = [d[key] for d in dicts]
    first = parts[0]
    size = first.numel()
    if first.is_contiguous() and all(
        p.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and p.shape == first.shape
        and p.is_contiguous()
        and p.storage_offset() == first.storage_offset() + e * size
        for e, p in enumerate(parts)
    ):
        stacked = first.as_strided((len(parts), *first.shape), (size, *first.stride()), first.storage_offset())
    else:
        stacked = torch.stack(parts).contiguous()
    for e, d in enumerate(dicts):
        d[key] = stacked[e]
    return stacked


def _same(dicts: list[dict], key: str, what: str):
    values = {d[key] if not isinstance(d[key], torch.Tensor) else tuple(d[key].shape) for d in dicts}
    if len(values) != 1:
        raise _NotGroupable(f"the experts differ in {what} ({sorted(map(str, values))})")
    return dicts[0][key]


def _static_input_scales(dicts: list[dict]) -> torch.Tensor | None:
    present = {d["input_scale"] is not None for d in dicts}
    if len(present) != 1:
        raise _NotGroupable("some experts have static activation scales and some dynamic ones")
    return torch.cat([d["input_scale"].reshape(1) for d in dicts]) if present.pop() else None


def _stack_side(scheme: str, dicts: list[dict]) -> dict:
    """One side (gate_up or down) of every expert, stacked [E, ...] for lmforge.kernels.cuda.quant_moe."""
    num_experts = len(dicts)
    if scheme == "wna16":
        if any(d.get("layout", "chunked") != "chunked" for d in dicts):  # LMFORGE_W4_KERNEL's column-major layout
            raise _NotGroupable("experts in the w4 layout (the grouped kernel reads the chunked one)")
        for key, what in (("bits", "bits"), ("group_size", "group size"), ("in_features", "in_features")):
            _same(dicts, key, what)
        if dicts[0]["group_size"] % KS and dicts[0]["group_size"] < dicts[0]["in_features"]:
            raise _NotGroupable(f"group size {dicts[0]['group_size']} (the grouped kernel takes multiples of {KS})")
        _same(dicts, "qweight", "qweight shape")
        side = {"mode": "wna16", "bits": dicts[0]["bits"], "group_size": dicts[0]["group_size"]}
        n, k = dicts[0]["out_features"], dicts[0]["in_features"]
        side["qweight"] = _stack(dicts, "qweight")
        side["scales"] = _stack(dicts, "scales")
        if all(d["zeros"] is None for d in dicts) and len({d["sym_zero"] for d in dicts}) == 1:
            side["zeros"], side["sym_zero"] = None, dicts[0]["sym_zero"]
        else:  # some experts asymmetric: the symmetric ones get their constant zero point written out
            for d in dicts:
                if d["zeros"] is None:
                    d["zeros"] = torch.full_like(d["scales"], d["sym_zero"])
                    d["sym_zero"] = 0
            side["zeros"], side["sym_zero"] = _stack(dicts, "zeros"), 0
    elif scheme == "fp8":
        mode = _same(dicts, "mode", "FP8 scale kind")
        _same(dicts, "weight", "weight shape")
        n, k = dicts[0]["weight"].shape
        if mode == "block":
            side = {"mode": "block", "block": _same(dicts, "block_size", "FP8 block size")}
            side["scale"] = _stack(dicts, "weight_scale")  # [E, cdiv(N, bn), cdiv(K, bk)]
            side["input_scale"] = None
        else:  # per tensor or per channel: a scale per output channel [E, N]
            side = {"mode": "row", "scale": _stack(dicts, "w_scale"), "input_scale": _static_input_scales(dicts)}
        side["weight"] = _stack(dicts, "weight")
    elif scheme == "int8":
        if any(d["zero_point"] for d in dicts):
            raise _NotGroupable("asymmetric static int8 activations (an input zero point)")
        _same(dicts, "weight", "weight shape")
        n, k = dicts[0]["weight"].shape
        side = {"mode": "row", "scale": _stack(dicts, "w_scale"), "input_scale": _static_input_scales(dicts)}
        side["weight"] = _stack(dicts, "weight")
    else:
        raise ValueError(f"unknown quantization scheme {scheme!r}; known: {sorted(_LINEAR)}")
    side.update(num_experts=num_experts, out_features=n, in_features=k)
    return side


# int4/int8 weight-only experts through the grouped kernel (off: the per-expert loop). Reworked tiles passed every
# case of tests/kernels/test_quant_moe_kernel.py on an H200; grouped int4 g128 on a Qwen3-30B-A3B-like layer took
# 35 us at 1 token and 154 us at 16 (the loop in a CUDA graph: 2,368 / 2,671 us), 2.3 ms at 2,048 (loop: 51 ms)
WNA16_GROUPED_MOE = True


def fused_moe_quantized_prepare(gate_up: list[dict], down: list[dict], scheme: str) -> dict:
    """The experts of one MoE layer, from each expert's `<scheme>_prepare` output of this backend ([2I, H] gate_up
    and [H, I] down weights), once after loading: their tensors are stacked [E, ...] for the grouped Triton kernel
    (lmforge.kernels.cuda.quant_moe), each expert's dict keeping a view of its slice. Experts the kernel cannot
    take keep the per-expert loop, `fallback` saying why: int8 W8A8 with an asymmetric static activation zero
    point, wna16 experts in the w4 layout (LMFORGE_W4_KERNEL), and wna16 while WNA16_GROUPED_MOE is off."""
    if scheme not in _LINEAR:
        raise ValueError(f"unknown quantization scheme {scheme!r} for fused_moe_quantized; known: {sorted(_LINEAR)}")
    if len(gate_up) != len(down) or not gate_up:
        raise ValueError(f"{len(gate_up)} gate_up experts but {len(down)} down experts")
    experts = {"scheme": scheme, "gate_up": gate_up, "down": down, "grouped": None, "fallback": None}
    if scheme == "wna16" and not WNA16_GROUPED_MOE:
        experts["fallback"] = "wna16 experts: the grouped kernel's wna16 path is switched off (WNA16_GROUPED_MOE)"
        return experts
    try:
        up_side, down_side = _stack_side(scheme, gate_up), _stack_side(scheme, down)
    except _NotGroupable as e:
        experts["fallback"] = str(e)
        return experts
    if up_side["out_features"] % 2 or down_side["in_features"] != up_side["out_features"] // 2:
        raise ValueError(
            f"experts gate_up [{up_side['out_features']}, {up_side['in_features']}] and down "
            f"[{down_side['out_features']}, {down_side['in_features']}] are not one gated MLP"
        )
    experts["grouped"] = (up_side, down_side)
    return experts


def fused_moe_quantized(
    hidden_states: torch.Tensor,
    experts: dict,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """MoE over quantized experts (`fused_moe_quantized_prepare`'s output), the cpu op's signature. The grouped
    Triton kernel reads only the routed experts' weights, reads nothing on the host, and so records in a CUDA graph.
    Experts it cannot take run the per-expert loop: eager calls read the per-expert token counts on the host (one
    sync); inside a CUDA-graph capture, where no value can be read, every expert runs on every token, weighted by
    its (mostly zero) routing weight."""
    if activation not in ("silu", "gelu", "gelu_tanh"):
        raise ValueError(f"unsupported MoE activation {activation!r}; supported: silu, gelu, gelu_tanh")
    scheme = experts["scheme"]
    if experts["grouped"] is not None:
        up_side, down_side = experts["grouped"]
        if scheme == "wna16" and hidden_states.dtype != up_side["scales"].dtype:
            raise ValueError(
                f"fused_moe_quantized: x is {hidden_states.dtype} but the experts' scales are {up_side['scales'].dtype}"
            )
        return fused_moe_quantized_grouped(hidden_states, up_side, down_side, topk_weights, topk_ids, activation)
    gate_up, down = experts["gate_up"], experts["down"]
    linear = _LINEAR[scheme]

    def expert(e: int, x: torch.Tensor) -> torch.Tensor:
        return linear(gated_activation(linear(x, gate_up[e]), activation), down[e])

    out = torch.zeros_like(hidden_states)
    if hidden_states.is_cuda and torch.cuda.is_current_stream_capturing():
        return moe_all_experts(hidden_states, len(gate_up), expert, topk_weights, topk_ids)
    top_k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)
    order = flat_ids.argsort(stable=True)
    counts = torch.bincount(flat_ids, minlength=len(gate_up)).tolist()
    token_of_slot, weight_of_slot = order // top_k, topk_weights.reshape(-1)[order]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tokens = token_of_slot[start : start + n]
        h = expert(e, hidden_states[tokens])
        out.index_add_(0, tokens, (h * weight_of_slot[start : start + n, None]).to(out.dtype))
        start += n
    return out


def moe_all_experts(
    hidden_states: torch.Tensor, num_experts: int, expert, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """sum_e routing_weight[t, e] * expert(e, x)[t] over all experts, with no value read on the host."""
    dense = torch.zeros(hidden_states.shape[0], num_experts, dtype=torch.float32, device=hidden_states.device)
    dense.scatter_add_(1, topk_ids.long(), topk_weights.float())
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    for e in range(num_experts):
        out += expert(e, hidden_states).float() * dense[:, e : e + 1]
    return out.to(hidden_states.dtype)
