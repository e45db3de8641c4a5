"""Where a batch-1 decode step's GPU time goes: the bs1 decode figure of throughput.py, a per-kernel table
(count and GPU time per step) of eager and of graph-replayed steps, the captured graph's GPU time per replay, and
optionally the M=1 GEMM (GEMV) time of the preset's projection shapes against the weight-read bound.

    python benchmarks/decode_profile.py --model llama-1b[,llama-8b,llama-1b:base] --model-dir DIR[,DIR8,DIR] [--gemv]
(a preset with ':base' runs with this branch's switchable batch-1 work off: main's kernels, for a before/after)
JSON lines to stdout, kernel tables to stderr.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import gc
import importlib
import os
import time
from unittest import mock

import torch
from common import device_name, emit, log
from throughput import PRESETS, VOCAB, bs1_ids, write_preset

from lmforge import GenerationConfig, PytorchEngineConfig


def kernel_table(prof, steps: int) -> tuple[list[tuple[str, float, float]], float, int]:
    """[(kernel name, count per step, GPU us per step)] sorted by time, the total GPU us and kernel count per step."""
    time_us: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        time_us[e.name] += e.time_range.elapsed_us()
        count[e.name] += 1
    rows = sorted(((n, count[n] / steps, t / steps) for n, t in time_us.items()), key=lambda r: -r[2])
    return rows, sum(r[2] for r in rows), round(sum(r[1] for r in rows))


def print_table(title: str, rows, total_us: float, n_kernels: int) -> None:
    lines = [f"{title}: {n_kernels} kernels, {total_us:.1f} us GPU per step", f"{'us/step':>9} {'n/step':>7}  kernel"]
    for name, n, t in rows:
        lines.append(f"{t:9.1f} {n:7.1f}  {name[:150]}")
    log("\n".join(lines))


def profile_steps(engine, steps: int):
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    return prof


def bs1_decode(engine, n_new: int = 256) -> dict:
    """throughput.py's batch-1 measure: 128 ids in, 256 greedy tokens out, after one untimed run."""
    greedy = GenerationConfig(max_new_tokens=n_new, min_new_tokens=n_new, top_k=1, ignore_eos=True)
    ids = bs1_ids(0)
    for _ in range(2):
        engine.add_request(ids, greedy)
        t_first, n = None, 0
        while engine.has_unfinished():
            for out in engine.step():
                if out.token_ids:
                    n += len(out.token_ids)
                    t_first = t_first or time.perf_counter()
        t_end = time.perf_counter()
    return dict(out_tok_s=round((n - 1) / (t_end - t_first), 1), out_tokens=n)


# (BLOCK_N, BLOCK_K, num_warps, num_stages) of the Triton GEMV to time beside its default
GEMV_SWEEP = [(2, 1024, 4, 3), (4, 512, 4, 3), (8, 512, 4, 3), (8, 256, 4, 4), (16, 256, 8, 3), (4, 1024, 8, 2)]


def gemv_shapes(name: str) -> dict[str, tuple[int, int]]:
    p = PRESETS[name]
    h, i = p["hidden_size"], p["intermediate_size"]
    d = h // p["num_attention_heads"]
    qkv = (p["num_attention_heads"] + 2 * p["num_key_value_heads"]) * d
    return {"qkv": (qkv, h), "o": (h, h), "gate_up": (2 * i, h), "down": (h, i), "lm_head": (VOCAB, h)}


def time_graph(fn, reps: int = 50, iters: int = 20) -> float:
    """GPU us per call of fn, from a CUDA graph of `reps` calls (no launch gaps)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * iters)


def _rotating(fn, args_list):
    """A zero-argument call of fn that takes the next argument tuple each time it is called (at graph capture)."""
    it = iter(range(1 << 30))
    return lambda: fn(*args_list[next(it) % len(args_list)])


def gemv_bench(name: str) -> None:
    torch.manual_seed(0)
    buf = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    us = time_graph(_rotating(torch.Tensor.copy_, [(torch.empty_like(buf), buf)]), reps=5, iters=4)
    emit(device=device_name("cuda"), measure="copy_bandwidth", gb_s=round(2 * buf.numel() / us / 1e3, 1))
    buf = None
    try:
        from lmforge.kernels.cuda.gemv import gemv
    except ImportError:
        gemv = None
    for shape_name, (n, k) in gemv_shapes(name).items():
        # a weight set per call, rotating, so the L2 cache (50 MB) holds none of them between calls
        copies = max(2, -(-200 * 2**20 // (n * k * 2)))
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        calls = [(x, torch.randn(n, k, device="cuda", dtype=torch.bfloat16)) for _ in range(copies)]
        fig = {}
        for lib in ("cublas", "cublaslt"):
            torch.backends.cuda.preferred_blas_library(lib)
            us = time_graph(_rotating(torch.nn.functional.linear, calls))
            fig[lib] = dict(us=round(us, 2), gb_s=round(n * k * 2 / us / 1e3, 1))
        torch.backends.cuda.preferred_blas_library("cublas")
        if gemv is not None:
            err = (gemv(*calls[0]).float() - torch.nn.functional.linear(*calls[0]).float()).abs().max().item()
            fig["triton_max_abs_diff_vs_cublas"] = err
            for cfg in [None, *GEMV_SWEEP]:
                us = time_graph(_rotating(functools.partial(gemv, config=cfg), calls))
                key = "triton_default" if cfg is None else "triton_" + "_".join(map(str, cfg))
                fig[key] = dict(us=round(us, 2), gb_s=round(n * k * 2 / us / 1e3, 1))
        emit(device=device_name("cuda"), measure="gemv_m1", model=name, shape=shape_name, n=n, k=k, **fig)
        calls = None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-1b", help="preset, or a comma list of presets profiled in turn")
    p.add_argument("--model-dir", required=True, help="preset folder (comma list, one per --model)")
    p.add_argument("--steps", type=int, default=10, help="profiled decode steps per table")
    p.add_argument("--gemv", action="store_true", help="also time the M=1 projections (cuBLAS / cuBLASLt)")
    p.add_argument("--no-engine", action="store_true", help="only the GEMV timing")
    p.add_argument("--no-gemv", action="store_true", help="dense layers on cuBLAS only (the Triton GEMV off)")
    p.add_argument("--baseline", action="store_true", help="every preset with this branch's batch-1 work off")
    p.add_argument("--gemv-models", help="comma list of presets to time the GEMV of (default: --model)")
    args = p.parse_args()
    base = dict(device=device_name("cuda"), model=args.model, gemv=not args.no_gemv, baseline=args.baseline)
    if args.no_gemv:
        importlib.import_module("lmforge.backends.cuda.linear").GEMV_ENABLED = False
    if args.gemv:
        for name in (args.gemv_models or args.model).split(","):
            gemv_bench(name)
    if args.no_engine:
        return
    models = args.model.split(",")
    dirs = args.model_dir.split(",")
    if len(dirs) != len(models):
        p.error("--model-dir needs one folder per --model")
    # "llama-1b:base" profiles that preset with every switchable fusion of this branch off
    unknown = [m for m in models if m.removesuffix(":base") not in PRESETS]
    if unknown:
        p.error(f"unknown preset(s) {unknown}; known: {sorted(PRESETS)} (a ':base' suffix allowed)")
    for name, path in zip(models, dirs, strict=True):
        baseline = args.baseline or name.endswith(":base")
        set_baseline(baseline, keep_gemv_off=args.no_gemv)
        name = name.removesuffix(":base")
        profile_model(name, path, args.steps, {**base, "model": name, "baseline": baseline}, baseline)
        gc.collect()
        torch.cuda.empty_cache()


def _with_cpu_cos_sin(init):
    from lmforge.backends.cpu.rotary import rotary_cos_sin

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.cos_sin = rotary_cos_sin

    return patched


def set_baseline(on: bool, keep_gemv_off: bool = False) -> None:
    """Every switch of this branch's batch-1 work to main's behaviour (on) or to the default (off): cuBLAS for one
    row, the separate fill and reduce kernels and splits of any size, hidden states out of the decode graphs. The
    sampler's argmax and the rotary cos/sin kernel are swapped per engine in profile_model."""
    importlib.import_module("lmforge.backends.cuda.linear").GEMV_ENABLED = not (on or keep_gemv_off)
    importlib.import_module("lmforge.backends.cuda.attention").FUSED_FILL_ENABLED = not on
    decode_kernels = importlib.import_module("lmforge.kernels.cuda.decode_attention")
    decode_kernels.FUSED_REDUCE_DEFAULT = not on
    decode_kernels.MIN_SPLIT_KEYS = 1 if on else 256
    decode_kernels.SMALL_GRID_MIN_SPLIT_KEYS = 1 if on else 64
    importlib.import_module("lmforge.engine.cuda_graph").LOGITS_MAX_BS = 0 if on else 16


def profile_model(name: str, path: str, steps: int, base: dict, baseline: bool = False) -> None:
    from lmforge.engine.engine import Engine

    if not os.path.exists(os.path.join(path, "config.json")):
        log(f"writing {name} to {path}")
        write_preset(name, path, 0)
    t0 = time.perf_counter()
    # batch 1 needs one graph and a small cache (a second model then fits beside what the first one left), and
    # short prefill chunks keep the warm-up (and its kernel compiles) short
    cfg = PytorchEngineConfig(dtype="bfloat16", max_batch_size=1, cache_max_entry_count=0.3, max_prefill_token_num=512)
    if baseline:  # the cos/sin of torch's eight launches, captured that way
        from lmforge.nn.rotary import RotaryEmbedding

        patch = mock.patch.object(RotaryEmbedding, "__init__", _with_cpu_cos_sin(RotaryEmbedding.__init__))
    else:
        patch = contextlib.nullcontext()
    with patch:
        engine = Engine(path, cfg)
    if baseline:
        engine.sampler.argmax = lambda x: x.argmax(dim=-1)
    log(f"{name}: engine ready in {time.perf_counter() - t0:.1f} s")
    emit(**base, measure="bs1_decode", **bs1_decode(engine))

    runner = engine.graph_runner
    greedy = GenerationConfig(max_new_tokens=200, min_new_tokens=200, top_k=1, ignore_eos=True)
    engine.add_request(bs1_ids(0), greedy)
    for _ in range(8):  # prefill, then decode
        engine.step()
    for mode in ("eager", "graph"):
        runner.enabled = mode == "graph"
        for _ in range(3):
            engine.step()
        engine.step_stats = dict.fromkeys(engine.step_stats, 0)
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t) / steps * 1e6
        host_us = {k: round(v / steps * 1e6) for k, v in engine.step_stats.items() if k.endswith("_s")}
        rows, total, n = kernel_table(profile_steps(engine, steps), steps)
        print_table(f"{name} bs1 decode, {mode}", rows, total, n)
        emit(
            **base,
            measure="bs1_step_kernels",
            mode=mode,
            kernels=n,
            gpu_us=round(total, 1),
            wall_us=round(wall_us),
            host_us_per_step=host_us,
        )
    runner.enabled = True
    if runner.graphs:
        g = runner.graphs[min(runner.graphs)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(50):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        emit(**base, measure="bs1_graph_replay", us=round(start.elapsed_time(end) * 1e3 / 50, 1))
    while engine.has_unfinished():
        engine.step()
    engine.close()


if __name__ == "__main__":
    main()
