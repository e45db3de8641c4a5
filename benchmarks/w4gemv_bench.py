"""W4A16 decode-kernel candidates on the llama-8b projections (one JSON line each): the cuda backend's wna16 op, the
column-major GEMV of lmforge.kernels.cuda.quant_w4gemv, and torch's built-in tinygemm int4 kernel
(aten._weight_int4pack_mm), beside bf16 F.linear; timed like benchmarks/quant.py (CUDA-graph replay over rotating
weight copies), each with its error against the fp32 dequantized reference.

    python3 benchmarks/w4gemv_bench.py [--m 1,2,4,8,16] [--cands wna16,gemv,dot,chunked,tinygemm] [--then cands]

Candidates: wna16 (the cuda backend's op, i.e. its per-M dispatch), gemv / dot (quant_w4gemv's kernels), chunked (the
quant_wna16 kernel on its own layout), tinygemm (torch's int4 kernel; its float zero point (8 - z) * s is rounded
to bf16, the one inexact step, which shows in rel_err).
"""

from __future__ import annotations

import argparse
import sys
import traceback

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from quant import BF16, DEVICE, LLAMA_8B, bf16_us, copies_for, emit, graph_us  # noqa: E402

from lmforge.backends import cuda as cuda_ops  # noqa: E402
from lmforge.kernels.cuda import quant_w4dot as gd  # noqa: E402
from lmforge.kernels.cuda import quant_w4gemv as gv  # noqa: E402
from lmforge.kernels.cuda.quant_wna16 import repack, wna16_gemm  # noqa: E402


def make(k, n, group=128):
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device=DEVICE)
    scales = (torch.rand(k // group, n, device=DEVICE) * 0.01 + 0.001).to(BF16)
    zeros = torch.randint(0, 16, (k // group, n), device=DEVICE).to(BF16)
    return qweight, scales, zeros


def codes_of(qweight):
    k = qweight.shape[0] * 8
    shifts = torch.arange(8, device=qweight.device, dtype=torch.int32) * 4
    return ((qweight[:, None, :] >> shifts[None, :, None]) & 15).reshape(k, -1)


def ref_weight_t(qweight, scales, zeros, group=128):
    q = codes_of(qweight).float()
    g = torch.arange(q.shape[0], device=q.device) // group
    return (q - zeros.float()[g]) * scales.float()[g]


def tinygemm_prepare(qweight, scales, zeros, group=128, inner_k_tiles=8):
    """Canonical -> tinygemm: codes [N, K] two per byte (even k high nibble), scale_and_zero [K/G, N, 2] bf16 with
    W = (q - 8) * s + zero, zero = (8 - z) * s rounded to bf16 (the one inexact step)."""
    q = codes_of(qweight).t().contiguous()  # [N, K]
    packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    w = torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles)
    sz = torch.stack([scales, ((8 - zeros.float()) * scales.float()).to(BF16)], dim=-1).contiguous()
    return w, sz


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def one(cand, proj, m, k, n, wb, cfg=None):
    base = [make(k, n) for _ in range(copies_for(wb))]
    x = torch.randn(m, k, device=DEVICE, dtype=BF16)
    ref = x.float() @ ref_weight_t(*base[0])
    if cand == "wna16":
        preps = [cuda_ops.OPS["wna16_prepare"](q, s, z, 4, 128) for q, s, z in base]
        fns = [lambda p=p: cuda_ops.OPS["wna16_linear"](x, p) for p in preps]
    elif cand == "gemv":
        preps = [(gv.repack_gemv(q), s, z) for q, s, z in base]
        fns = [lambda p=p: gv.w4_gemv(x, p[0], p[1], p[2], 128, config=cfg) for p in preps]
    elif cand == "dot":
        preps = [(gv.repack_gemv(q), s, z) for q, s, z in base]
        fns = [lambda p=p: gd.w4_dot(x, p[0], p[1], p[2], 128, config=cfg) for p in preps]
    elif cand == "chunked":  # the chunked-layout kernel of quant_wna16 (the path before the w4 layout)
        preps = [(repack(q, 4), s, z) for q, s, z in base]
        fns = [lambda p=p: wna16_gemm(x, p[0], p[1], p[2], 4, 128) for p in preps]
    elif cand == "tinygemm":
        preps = [tinygemm_prepare(*b) for b in base]
        fns = [lambda p=p: torch.ops.aten._weight_int4pack_mm(x, p[0], 128, p[1]) for p in preps]
    err = rel(fns[0](), ref)
    del base
    us = graph_us(fns)
    ref_us = bf16_us(m, k, n)
    num_bytes = wb + m * k * 2 + m * n * 2
    emit(
        {
            "scheme": f"w4_{cand}",
            "proj": proj,
            "M": m,
            "us": round(us, 2),
            "gb_s": round(num_bytes / us / 1e3, 1),
            "bf16_us": round(ref_us, 2),
            "speedup_vs_bf16": round(ref_us / us, 3),
            "rel_err": round(err, 6),
            **({"config": cfg} if cfg else {}),
            **({"m1_kernel": preps[0]["m1_kernel"]} if cand == "wna16" else {}),
        }
    )


def warm_up(seconds: float = 2.0) -> None:
    """Busy the GPU before timing (clocks up), then the copy bandwidth: the ceiling of a weight-streaming kernel."""
    import time

    a = torch.randn(8192, 8192, device=DEVICE, dtype=BF16)
    end = time.perf_counter() + seconds
    while seconds and time.perf_counter() < end:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
    del a
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    us = graph_us([lambda: dst.copy_(src)])
    emit({"scheme": "copy", "bytes": src.numel(), "us": round(us, 1), "gb_s": round(2 * src.numel() / us / 1e3, 1)})


def sweep(cand, m, cfgs, projs):
    for proj in projs:
        k, n = LLAMA_8B[proj]
        wb = k * n / 2 + 4 * (k // 128) * n
        for cfg in cfgs:
            try:
                one(cand, proj, m, k, n, wb, cfg)
            except Exception:
                emit({"scheme": f"w4_{cand}", "proj": proj, "config": cfg, "error": traceback.format_exc()[-800:]})


def run_cases(cands, projs, ms):
    for cand in cands:
        for proj in projs:
            k, n = LLAMA_8B[proj]
            wb = k * n / 2 + 4 * (k // 128) * n
            for m in ms:
                if cand == "gemv" and m > 4 or cand == "tinygemm" and m > 64:
                    continue
                try:
                    one(cand, proj, m, k, n, wb)
                except Exception:
                    emit({"scheme": f"w4_{cand}", "proj": proj, "M": m, "error": traceback.format_exc()[-800:]})
                torch.cuda.empty_cache()


# tools/sass_report.py (Triton 3.9, sm_90, llama-8b shapes): 256 / 2 warps takes 255 registers and spills 72 bytes,
# 512 / 2 warps (the gate_up default) spills 1,064 bytes (182 stores and reloads a K tile); 256 / 4, 128 / 2 and
# 512 / 8 warps fit (112, 167, 234 registers, no spills) at 3.3-3.4 instructions a code against 3.1
GEMV_SWEEP = [
    dict(BLOCK_N=256, num_warps=2),
    dict(BLOCK_N=512, num_warps=2),
    dict(BLOCK_N=512, num_warps=4),
    dict(BLOCK_N=1024, num_warps=4),
    dict(BLOCK_N=512, num_warps=2, waves=8.0),
    dict(BLOCK_N=256, num_warps=2, PREFETCH=True),
    dict(BLOCK_N=256, num_warps=4),
    dict(BLOCK_N=128, num_warps=2),
    dict(BLOCK_N=512, num_warps=8),
]

DOT_SWEEP = [
    dict(BLOCK_N=256, num_warps=4, num_stages=3),
    dict(BLOCK_N=128, num_warps=4, num_stages=4),
    dict(BLOCK_N=256, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, num_warps=4, num_stages=3, waves=6.0),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="1,2,4,8,16")
    ap.add_argument("--cands", default="wna16,gemv,tinygemm")
    ap.add_argument("--proj", default=",".join(LLAMA_8B))
    ap.add_argument(
        "--then",
        default="",
        help="comma list of extra phases after the main cases: cands (the chunked kernel, GEMV and dot launch "
        "variants, tinygemm), small (tinygemm, dot and wna16 at M=4,16)",
    )
    ap.add_argument("--no-warm-up", action="store_true", help="the GPU is busy already: no 2 s warm-up")
    args = ap.parse_args()
    warm_up(0.0 if args.no_warm_up else 2.0)
    run_cases(args.cands.split(","), args.proj.split(","), [int(v) for v in args.m.split(",")])
    if "cands" in args.then:
        run_cases(["chunked"], ["gate_up_proj", "down_proj"], [1, 16])
        sweep("gemv", 1, GEMV_SWEEP, ["gate_up_proj", "o_proj", "down_proj"])
        run_cases(["dot"], ["gate_up_proj", "o_proj"], [1])
        sweep("dot", 16, DOT_SWEEP, ["gate_up_proj", "o_proj"])
        run_cases(["tinygemm"], ["gate_up_proj"], [1, 16])
        run_cases(["wna16", "chunked"], ["gate_up_proj", "down_proj"], [2048])
    if "small" in args.then:
        run_cases(["tinygemm", "dot", "wna16"], ["gate_up_proj", "down_proj"], [4, 16])


if __name__ == "__main__":
    main()
