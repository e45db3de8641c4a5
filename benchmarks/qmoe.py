"""MoE over quantized experts on one GPU: the grouped Triton kernel (lmforge.kernels.cuda.quant_moe) against the
per-expert loop it replaces, on a Qwen3-30B-A3B-like layer (128 experts, top-8, hidden 2048, moe_intermediate 768).

One JSON line per figure (device, scheme, tokens, path, us per call):
  - grouped: the cuda backend's fused_moe_quantized, R calls with R different random routings captured in one CUDA
    graph and replayed, divided by R (the routed experts' weights then come from HBM, not from L2);
  - loop_eager: the per-expert loop (the fallback; eager, one host sync per call), wall time per call;
  - loop_graph: what a captured decode step ran before the grouped kernel: every expert on every token;
  - bf16_grouped: the bf16 fused_moe kernel on the same layer with bf16 weights, for scale.
Each grouped line also carries its relative error against the loop on the same inputs (rel_err_vs_loop) and the
routed experts' weight bytes per second (weight_gb_s).

    python3 benchmarks/qmoe.py [--schemes fp8-block,int4-g128] [--tokens 1,16,64,2048] [--sweep] [--deadline S]
        [--compile-only --shard I/N]

--sweep times tile variants of the grouped kernel (`config`, first scheme); --deadline stops starting new
measurements S seconds after the start (what was measured is already printed). --compile-only --shard i/n runs
every n-th measurement's calls once without timing: n such processes side by side fill Triton's on-disk cache for
the timed run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
import traceback

import torch
from quant import graph_us  # benchmarks/ is sys.path[0] when this file runs

from lmforge.backends import cuda as cuda_ops
from lmforge.kernels.cuda.activation import gated_activation
from lmforge.kernels.cuda.fused_moe import fused_moe
from lmforge.kernels.cuda.quant_moe import fused_moe_quantized_grouped, launch_config

DEVICE = torch.device("cuda")
BF16 = torch.bfloat16
E, TOP_K, HIDDEN, INTER = 128, 8, 2048, 768
START = time.time()


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


HEADER = {"bench": "qmoe", "git_sha": _git_sha(), "device": torch.cuda.get_device_name(), "torch": torch.__version__}
LAYER = {"experts": E, "top_k": TOP_K, "hidden": HIDDEN, "moe_intermediate": INTER}


def emit(rec: dict) -> None:
    print(json.dumps({**HEADER, **rec, "t_s": round(time.time() - START, 1)}), flush=True)


def make_layer(scheme: str) -> dict:
    """Random experts in the scheme's canonical form, prepared by the cuda backend (and stacked)."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    sides = []
    for n, k in ((2 * INTER, HIDDEN), (HIDDEN, INTER)):
        experts = []
        for _ in range(E):
            if scheme == "fp8-block":
                w = (torch.randn(n, k, device=DEVICE, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
                scale = torch.rand(n // 128, k // 128, device=DEVICE, generator=gen) * 1e-4 + 1e-4
                experts.append(cuda_ops.OPS["fp8_prepare"](w, scale, None, (128, 128)))
            else:  # int4-g128, symmetric
                q = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), device=DEVICE, dtype=torch.int32, generator=gen)
                scales = (torch.rand(k // 128, n, device=DEVICE, generator=gen) * 0.01 + 0.005).to(BF16)
                zeros = torch.full_like(scales, 8.0)
                experts.append(cuda_ops.OPS["wna16_prepare"](q, scales, zeros, 4, 128))
        sides.append(experts)
    op = "fp8" if scheme.startswith("fp8") else "wna16"
    return cuda_ops.OPS["fused_moe_quantized_prepare"](sides[0], sides[1], op)


def routing(num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(num_tokens, E, device=DEVICE)
    w, ids = logits.softmax(-1).topk(TOP_K, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


def eager_us(fn, calls: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / calls


def bind(fn, *args):
    """A zero-argument call of fn(*args), the arguments bound now."""
    return lambda: fn(*args)


def guarded(step: str, fn, *args) -> bool:
    """Runs fn(*args); a failure is printed as an error line (with the step) and the benchmark goes on."""
    try:
        fn(*args)
        return True
    except Exception as e:  # noqa: BLE001 - a benchmark reports every failure and continues
        emit({"step": step, "error": f"{type(e).__name__}: {e}"[:800], "trace": traceback.format_exc()[-1500:]})
        torch.cuda.synchronize()
        return False


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


SWEEP = {
    "decode": [
        dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=4),
        dict(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=3),
        dict(BLOCK_M=16, BLOCK_N=64, num_warps=2, num_stages=4),
    ],
    "prefill": [
        dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schemes", default="fp8-block,int4-g128")
    parser.add_argument("--tokens", default="1,16,64,2048")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--deadline", type=float, default=1e9)
    parser.add_argument("--compile-only", action="store_true", help="run each job's calls once, time nothing")
    parser.add_argument("--shard", default="0/1", help="i/n: only every n-th job from the i-th (with --compile-only)")
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    schemes = args.schemes.split(",")
    shard, num_shards = (int(v) for v in args.shard.split("/"))
    op = cuda_ops.OPS["fused_moe_quantized"]

    def time_left() -> bool:
        return time.time() - START < args.deadline

    inputs = {}
    for t in tokens:  # 8 routings per decode graph (their weights do not fit in L2 together), 2 for prefill
        x = torch.randn(t, HIDDEN, device=DEVICE).to(BF16)
        inputs[t] = [(x, *routing(t)) for _ in range(8 if t <= 64 else 2)]
    layers: dict[str, dict] = {}

    def layer_of(scheme: str) -> dict:
        if scheme not in layers:
            layers[scheme] = make_layer(scheme)
        return layers[scheme]

    def measure(scheme, t, loop_graph: bool):
        layer = layer_of(scheme)
        loop_layer = dict(layer, grouped=None)
        x, w, ids = inputs[t][0]
        err = rel_err(op(x, layer, w, ids, "silu"), op(x, loop_layer, w, ids, "silu"))
        if args.compile_only:
            if loop_graph and t <= 64:  # the all-experts form's kernels (M = t for every expert)
                linear = cuda_ops.OPS[f"{layer['scheme']}_linear"]
                linear(gated_activation(linear(x, layer["gate_up"][0]), "silu"), layer["down"][0])
            return
        us = graph_us([bind(op, c[0], layer, c[1], c[2], "silu") for c in inputs[t]], replays=10)
        loop_us = eager_us(bind(op, x, loop_layer, w, ids, "silu"), calls=3 if t > 64 else 5)
        rec = {"scheme": scheme, "tokens": t, **LAYER, "path": "grouped", "us": round(us, 2)}
        # the routed experts' weight bytes per call over the time: how close the kernel gets to HBM bandwidth
        per_expert = 3 * INTER * HIDDEN * (1 if scheme.startswith("fp8") else 0.5)
        routed = sum(c[2].unique().numel() for c in inputs[t]) / len(inputs[t])
        rec.update(routed_experts=routed, weight_gb_s=round(routed * per_expert / us / 1e3, 1))
        rec.update(loop_eager_us=round(loop_us, 1), speedup_vs_loop_eager=round(loop_us / us, 2))
        if loop_graph and t <= 64 and time_left():
            graph = graph_us([bind(op, x, loop_layer, w, ids, "silu")], replays=2)
            rec.update(loop_graph_us=round(graph, 1), speedup_vs_loop_graph=round(graph / us, 2))
        rec.update(rel_err_vs_loop=round(err, 5), config=launch_config(t * TOP_K, E))
        emit(rec)

    bf16_weights: list = []

    def bf16(t):
        if not bf16_weights:
            bf16_weights.append(torch.randn(E, 2 * INTER, HIDDEN, device=DEVICE, dtype=BF16) * 0.02)
            bf16_weights.append(torch.randn(E, HIDDEN, INTER, device=DEVICE, dtype=BF16) * 0.02)
        gate_up, down = bf16_weights
        calls = [bind(fused_moe, c[0], gate_up, down, c[1], c[2]) for c in inputs[t]]
        if args.compile_only:
            calls[0]()
            return
        emit(
            {
                "scheme": "bf16",
                "tokens": t,
                **LAYER,
                "path": "bf16_grouped",
                "us": round(graph_us(calls, replays=10), 2),
            }
        )

    def sweep(t, cfg):
        layer = layer_of(schemes[0])
        up_side, down_side = layer["grouped"]
        calls = [
            bind(fused_moe_quantized_grouped, c[0], up_side, down_side, c[1], c[2], "silu", cfg) for c in inputs[t]
        ]
        x, w, ids = inputs[t][0]
        err = rel_err(calls[0](), op(x, layer, w, ids, "silu"))
        if not args.compile_only:
            us = graph_us(calls, replays=10)
            emit(
                {"scheme": schemes[0], "tokens": t, "path": "sweep", "config": cfg, "us": round(us, 2), "rel_err": err}
            )

    # the table first (each figure printed as it is measured), bf16 for scale, the sweep, the other schemes
    jobs = [(f"measure {schemes[0]} t{t}", measure, schemes[0], t, True) for t in tokens]
    jobs += [(f"bf16 t{t}", bf16, t) for t in (min(tokens), max(tokens))]
    if args.sweep:
        for t in (min(tokens), max(tokens)):
            jobs += [(f"sweep t{t} {cfg}", sweep, t, cfg) for cfg in SWEEP["decode" if t <= 64 else "prefill"]]
    jobs += [(f"measure {s} t{t}", measure, s, t, False) for s in schemes[1:] for t in tokens]
    if args.compile_only:
        jobs = jobs[shard::num_shards]
    for name, fn, *fn_args in jobs:
        if not time_left():
            emit({"deadline": args.deadline, "skipped_from": name})
            break
        guarded(name, fn, *fn_args)
    torch.cuda.synchronize()
    if args.compile_only:
        emit({"compiled_shard": args.shard, "jobs": [j[0] for j in jobs]})


if __name__ == "__main__":
    main()
