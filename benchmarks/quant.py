"""Quantized linear ops of the cuda backend on the llama-8b projection shapes, against bf16 F.linear of the same shape.

One JSON line per (scheme, projection, M): device, shape, us per call, achieved GB/s (weight + activation + output
bytes / time) and TFLOP/s, the bf16 time and the speedup over it. Each time is one CUDA-graph replay of the op on
R rotating weight copies (R * weight bytes > 8x the L2), divided by R: what a captured decode step pays, with the
weights streamed from HBM as in a model forward, and no launch overhead. A `decode_estimate` line sums the four
projections of a layer at each decode M (the share of a decode step that the quantized weights speed up).

    python3 benchmarks/quant.py [--only wna16,fp8,int8] [--m 1,4,16,64,300,2048] [--sweep]

--sweep also times the launch-config variants of the kernels (tile sizes, split-K, GEMV vs dot, magic-number
dequantization, the dense-GEMM path of wna16) for tuning the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import traceback

import torch
import torch.nn.functional as F

from lmforge.backends import cuda as cuda_ops
from lmforge.backends.cuda.quant import W4_GEMV_MAX_M, WNA16_DENSE_MIN_M, wna16_dequantize
from lmforge.kernels.cuda.quant_act import quantize_per_group_fp8, quantize_per_token
from lmforge.kernels.cuda.quant_scaled_mm import scaled_mm
from lmforge.kernels.cuda.quant_wna16 import default_config, repack, wna16_gemm

DEVICE = torch.device("cuda")
BF16 = torch.bfloat16
# llama-8b (hidden 4096, 32 heads / 8 kv heads of 128, intermediate 14336): name -> (K, N), per layer
LLAMA_8B = {"qkv_proj": (4096, 6144), "o_proj": (4096, 4096), "gate_up_proj": (4096, 28672), "down_proj": (14336, 4096)}
NUM_LAYERS = 32


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


HEADER = {"bench": "quant", "git_sha": _git_sha(), "device": torch.cuda.get_device_name(), "torch": torch.__version__}


def emit(rec: dict) -> None:
    print(json.dumps({**HEADER, **rec}), flush=True)


def graph_us(fns: list, replays: int = 20) -> float:
    """Microseconds per call: fns (one per weight copy) captured back to back in one graph, replayed."""
    for fn in fns[:2]:
        fn()  # compile and warm outside the capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (replays * len(fns)))
    del graph
    return sorted(times)[len(times) // 2]


def copies_for(weight_bytes: float) -> int:
    l2 = getattr(torch.cuda.get_device_properties(DEVICE), "L2_cache_size", 60 << 20)
    return max(2, min(64, math.ceil(8 * l2 / weight_bytes)))


_BF16_US: dict[tuple[int, int, int], float] = {}


def bf16_us(m: int, k: int, n: int) -> float:
    key = (m, k, n)
    if key not in _BF16_US:
        reps = copies_for(2 * k * n)
        weights = [torch.randn(n, k, device=DEVICE, dtype=BF16) for _ in range(reps)]
        x = torch.randn(m, k, device=DEVICE, dtype=BF16)
        _BF16_US[key] = graph_us([lambda w=w: F.linear(x, w) for w in weights])
        del weights
    return _BF16_US[key]


def record(
    scheme: str, proj: str, m: int, k: int, n: int, us: float, weight_bytes: float, act_bytes: int, **extra
) -> dict:
    ref = bf16_us(m, k, n)
    num_bytes = weight_bytes + m * k * act_bytes + m * n * 2
    rec = {
        "scheme": scheme,
        "proj": proj,
        "shape": {"M": m, "K": k, "N": n},
        "us": round(us, 2),
        "gb_s": round(num_bytes / us / 1e3, 1),
        "tflop_s": round(2 * m * k * n / us / 1e6, 1),
        "bf16_us": round(ref, 2),
        "speedup_vs_bf16": round(ref / us, 3),
        **extra,
    }
    emit(rec)
    return rec


# ---- per-scheme cases: (fns over rotating copies, weight bytes) ----


def wna16_case(m, k, n, bits=4, group=128):
    p_words = 32 // bits
    weight_bytes = k * n * bits / 8 + 2 * 2 * (k // group) * n
    preps = []
    for _ in range(copies_for(weight_bytes)):
        qweight = torch.randint(-(2**31), 2**31 - 1, (k // p_words, n), dtype=torch.int32, device=DEVICE)
        scales = (torch.rand(k // group, n, device=DEVICE) * 0.01).to(BF16)
        zeros = torch.randint(0, 1 << bits, (k // group, n), device=DEVICE).to(BF16)
        preps.append(cuda_ops.OPS["wna16_prepare"](qweight, scales, zeros, bits, group))
    x = torch.randn(m, k, device=DEVICE, dtype=BF16)
    return x, preps, weight_bytes


def fp8_case(m, k, n, block: bool):
    weight_bytes = k * n + (4 * (n // 128) * (k // 128) if block else 4 * n)
    preps = []
    for _ in range(copies_for(weight_bytes)):
        w = torch.randn(n, k, device=DEVICE).to(torch.float8_e4m3fn)
        if block:
            preps.append(
                cuda_ops.OPS["fp8_prepare"](w, torch.rand(n // 128, k // 128, device=DEVICE), None, (128, 128))
            )
        else:
            preps.append(cuda_ops.OPS["fp8_prepare"](w, torch.rand(n, 1, device=DEVICE) * 0.01, None, None))
    return torch.randn(m, k, device=DEVICE, dtype=BF16), preps, weight_bytes


def int8_case(m, k, n):
    weight_bytes = k * n + 4 * n
    preps = [
        cuda_ops.OPS["int8_prepare"](
            torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEVICE),
            torch.rand(n, 1, device=DEVICE) * 0.01,
            None,
            None,
        )
        for _ in range(copies_for(weight_bytes))
    ]
    return torch.randn(m, k, device=DEVICE, dtype=BF16), preps, weight_bytes


def guarded(scheme: str, proj: str, m: int, fn) -> None:
    """One case; an error is reported as a JSON line and the run goes on."""
    try:
        fn()
    except Exception:
        emit({"scheme": scheme, "proj": proj, "M": m, "error": traceback.format_exc()[-1200:]})
    torch.cuda.empty_cache()


def run_wna16(ms, sweep: set, results: list) -> None:
    for proj, (k, n) in LLAMA_8B.items():
        for m in ms:
            guarded("wna16", proj, m, lambda proj=proj, k=k, n=n, m=m: _wna16_one(proj, m, k, n, sweep, results))
        guarded("wna16_int8", proj, 1, lambda proj=proj, k=k, n=n: _wna16_w8(proj, k, n, results))


def _wna16_w8(proj, k, n, results) -> None:
    op = cuda_ops.OPS["wna16_linear"]
    x, preps, wb = wna16_case(1, k, n, bits=8)
    results.append(
        record("wna16_int8_g128", proj, 1, k, n, graph_us([lambda p=p, x=x: op(x, p) for p in preps]), wb, 2)
    )


def _wna16_one(proj, m, k, n, sweep, results) -> None:
    op = cuda_ops.OPS["wna16_linear"]
    x, preps, wb = wna16_case(m, k, n)
    us = graph_us([lambda p=p: op(x, p) for p in preps])
    if m >= WNA16_DENSE_MIN_M:
        cfg = "dense"
    elif preps[0]["layout"] == "w4":
        cfg = "w4_gemv" if m <= W4_GEMV_MAX_M and preps[0]["m1_kernel"] == "gemv" else "w4_dot"
    else:
        cfg = default_config(m, n, k, 4, DEVICE)
    results.append(record("wna16_int4_g128", proj, m, k, n, us, wb, 2, config=cfg))
    if m >= 64:  # dequantize to bf16 + cuBLAS, the path wna16_linear takes from WNA16_DENSE_MIN_M rows
        fns = [lambda p=p: x @ wna16_dequantize(p) for p in preps]
        results.append(record("wna16_int4_g128_dense_path", proj, m, k, n, graph_us(fns), wb, 2))
    if m in sweep:
        sweep_wna16(x, preps, proj, m, k, n, wb)


def _wna16_variants(m: int, k: int, n: int) -> list[dict]:
    """Decode-shaped launch variants (larger M: the dense path is timed beside the default instead)."""
    auto = default_config(m, n, k, 4, DEVICE)
    split = auto["SPLIT_K"]
    out = []
    if m == 1:
        for bn in (32, 64, 128):
            for sk in sorted({split, 2 * split, max(1, split // 2)}):
                out.append(dict(BLOCK_M=1, BLOCK_N=bn, SPLIT_K=sk, USE_DOT=False, num_warps=4, num_stages=3))
        out.append(dict(BLOCK_M=1, BLOCK_N=64, SPLIT_K=split, USE_DOT=False, ASM=False, num_warps=4, num_stages=3))
        out.append(dict(BLOCK_M=1, BLOCK_N=64, SPLIT_K=split, USE_DOT=False, FOLD=False, num_warps=4, num_stages=3))
        out.append(dict(BLOCK_M=1, BLOCK_N=64, SPLIT_K=split, USE_DOT=False, num_warps=2, num_stages=3))
        out.append(dict(BLOCK_M=1, BLOCK_N=64, SPLIT_K=split, USE_DOT=False, num_warps=4, num_stages=5))
    if 1 <= m <= 16:
        for bn in (64, 128):
            for sk in sorted({split, 2 * split}):
                out.append(dict(BLOCK_M=16, BLOCK_N=bn, SPLIT_K=sk, USE_DOT=True, num_warps=4, num_stages=4))
        out.append(dict(BLOCK_M=16, BLOCK_N=128, SPLIT_K=split, USE_DOT=True, FOLD=False, num_warps=4, num_stages=4))
        out.append(dict(BLOCK_M=16, BLOCK_N=128, SPLIT_K=split, USE_DOT=True, ASM=False, num_warps=4, num_stages=4))
        out.append(dict(BLOCK_M=16, BLOCK_N=128, SPLIT_K=split, USE_DOT=True, num_warps=8, num_stages=4))
    return out


def sweep_wna16(x, preps, proj, m, k, n, wb) -> None:
    """The chunked-layout kernel's variants (group 128 4-bit weights take quant_w4gemv's layout in wna16_prepare:
    benchmarks/w4gemv_bench.py sweeps those); the weights are repacked here for it."""
    variants = _wna16_variants(m, k, n)
    if preps[0]["layout"] != "chunked":
        shifts = torch.arange(8, device=DEVICE, dtype=torch.int32) * 4
        chunked = []
        for p in preps:
            from lmforge.kernels.cuda.quant_w4gemv import unpack_gemv

            codes = unpack_gemv(p["qweight"])  # [K, N]
            canon = (codes.view(-1, 8, codes.shape[1]) << shifts[None, :, None]).sum(1, dtype=torch.int64)
            canon = torch.where(canon >= 2**31, canon - 2**32, canon).to(torch.int32)
            chunked.append({**p, "qweight": repack(canon, 4)})
        preps = chunked
    for cfg in variants:
        for magic in (True,):
            try:
                fns = [
                    lambda p=p, cfg=cfg, magic=magic: wna16_gemm(
                        x, p["qweight"], p["scales"], p["zeros"], 4, 128, config=cfg, magic=magic
                    )
                    for p in preps
                ]
                record("wna16_int4_g128_sweep", proj, m, k, n, graph_us(fns), wb, 2, config=cfg, magic=magic)
            except Exception as exc:  # a config that does not compile (shared memory) is reported, not fatal
                emit({"scheme": "wna16_int4_g128_sweep", "proj": proj, "M": m, "config": cfg, "error": repr(exc)[:300]})


def run_fp8(ms, sweep: set, results: list) -> None:
    for proj, (k, n) in LLAMA_8B.items():
        for m in ms:
            for block in (False, True):
                guarded(
                    "fp8",
                    proj,
                    m,
                    lambda proj=proj, k=k, n=n, m=m, block=block: _fp8_one(proj, m, k, n, block, sweep, results),
                )


def _fp8_one(proj, m, k, n, block, sweep, results) -> None:
    op = cuda_ops.OPS["fp8_linear"]
    x, preps, wb = fp8_case(m, k, n, block)
    name = "fp8_block128" if block else "fp8_channel_dynamic"
    results.append(record(name, proj, m, k, n, graph_us([lambda p=p: op(x, p) for p in preps]), wb, 2))
    if m in sweep and block:
        scaled_mm_blockwise(x, preps, proj, m, k, n, wb)
    if m in sweep and block and m > 64:
        for bm, bn, warps, stages in ((128, 128, 4, 3), (64, 128, 4, 4), (128, 256, 8, 3), (128, 128, 8, 4)):
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, SPLIT_K=1, num_warps=warps, num_stages=stages)

            def block_fp8(p, cfg=cfg):
                codes, xs = quantize_per_group_fp8(x, 128)
                return scaled_mm(codes, p["weight"], xs, p["weight_scale"], BF16, block_size=(128, 128), config=cfg)

            record(
                "fp8_block128_sweep",
                proj,
                m,
                k,
                n,
                graph_us([lambda p=p: block_fp8(p) for p in preps]),
                wb,
                2,
                config=cfg,
            )
    if m in sweep and not block:  # the Triton scaled GEMM instead of torch._scaled_mm

        def triton_fp8(p):
            codes, xs = quantize_per_token(x, torch.float8_e4m3fn)
            return scaled_mm(codes, p["weight"], xs, p["w_scale"], BF16)

        record("fp8_channel_dynamic_triton", proj, m, k, n, graph_us([lambda p=p: triton_fp8(p) for p in preps]), wb, 2)
        fns = [lambda p=p: torch._scaled_mm(*_fp8_rowwise_args(x, p), out_dtype=BF16) for p in preps]
        record("fp8_channel_dynamic_scaled_mm", proj, m, k, n, graph_us(fns), wb, 2)


def scaled_mm_blockwise(x, preps, proj, m, k, n, wb) -> None:
    """torch._scaled_mm's blockwise mode (1x128 activation, 128x128 weight scales; its meta function accepts
    scale_a [M, K/128] and scale_b [K/128, N/128]), not yet seen running on the device: each scale layout is tried,
    and its error against the Triton block kernel reported next to the time."""
    op = cuda_ops.OPS["fp8_linear"]
    for layout in ("row-major", "column-major"):

        def blockwise(p, layout=layout):
            codes, xs = quantize_per_group_fp8(x, 128)
            if layout == "column-major":
                xs = xs.t().contiguous().t()
            return torch._scaled_mm(codes, p["weight"].t(), xs, p["weight_scale"].t(), out_dtype=BF16)

        try:
            got, want = blockwise(preps[0]).float(), op(x, preps[0]).float()
            err = ((got - want).norm() / want.norm()).item()
            record(
                "fp8_block128_scaled_mm",
                proj,
                m,
                k,
                n,
                graph_us([lambda p=p: blockwise(p) for p in preps]),
                wb,
                2,
                scale_layout=layout,
                rel_err_vs_triton=round(err, 5),
            )
        except Exception as exc:
            emit(
                {
                    "scheme": "fp8_block128_scaled_mm",
                    "proj": proj,
                    "M": m,
                    "scale_layout": layout,
                    "error": repr(exc)[:400],
                }
            )


def _fp8_rowwise_args(x, p):
    codes, xs = quantize_per_token(x, torch.float8_e4m3fn)
    return codes, p["weight"].t(), xs.view(-1, 1), p["w_scale"].view(1, -1)


def run_int8(ms, sweep: set, results: list) -> None:
    for proj, (k, n) in LLAMA_8B.items():
        for m in ms:
            guarded("int8", proj, m, lambda proj=proj, k=k, n=n, m=m: _int8_one(proj, m, k, n, sweep, results))


def _int8_one(proj, m, k, n, sweep, results) -> None:
    op = cuda_ops.OPS["int8_linear"]
    x, preps, wb = int8_case(m, k, n)
    results.append(record("int8_dynamic", proj, m, k, n, graph_us([lambda p=p: op(x, p) for p in preps]), wb, 2))
    if m in sweep and m > 16:  # torch._int_mm (needs M > 16) + the scale epilogue in torch

        def int_mm(p):
            codes, xs = quantize_per_token(x, torch.int8)
            acc = torch._int_mm(codes, p["weight"].t())
            return (acc.float() * xs[:, None] * p["w_scale"][None, :]).to(BF16)

        record("int8_dynamic_int_mm", proj, m, k, n, graph_us([lambda p=p: int_mm(p) for p in preps]), wb, 2)


def decode_estimate(results: list) -> None:
    """Per decode M: the layer's four projections summed, x 32 layers, quantized vs bf16."""
    by = {}
    for r in results:
        if r["shape"]["M"] <= 16:
            by.setdefault((r["scheme"], r["shape"]["M"]), {})[r["proj"]] = r
    for (scheme, m), recs in sorted(by.items()):
        if len(recs) == len(LLAMA_8B):
            q = sum(r["us"] for r in recs.values()) * NUM_LAYERS
            ref = sum(r["bf16_us"] for r in recs.values()) * NUM_LAYERS
            emit(
                {
                    "scheme": scheme,
                    "proj": "decode_estimate",
                    "M": m,
                    "layers_us": round(q, 1),
                    "bf16_layers_us": round(ref, 1),
                    "speedup_vs_bf16": round(ref / q, 3),
                }
            )


def bench_copy() -> None:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    us = graph_us([lambda: dst.copy_(src)])
    emit({"scheme": "copy", "bytes": src.numel(), "us": round(us, 1), "gb_s": round(2 * src.numel() / us / 1e3, 1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="wna16,fp8,int8")
    parser.add_argument("--m", default="1,4,16,64,300,2048", help="token counts (rows) to time")
    parser.add_argument("--sweep", action="store_true", help="also time launch-config variants")
    parser.add_argument("--sweep-m", default="1,16,2048", help="the token counts the sweep covers")
    args = parser.parse_args()
    ms = [int(v) for v in args.m.split(",")]
    sweep = {int(v) for v in args.sweep_m.split(",")} if args.sweep else set()
    # the copy bandwidth: the ceiling a weight-streaming kernel is held to
    bench_copy()
    results: list = []
    runners = {"wna16": run_wna16, "fp8": run_fp8, "int8": run_int8}
    for name in args.only.split(","):
        runners[name](ms, sweep, results)
    decode_estimate(results)


if __name__ == "__main__":
    main()
