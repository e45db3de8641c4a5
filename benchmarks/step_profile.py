"""Where a step's time goes: per-step wall time by kind (decode via graph, decode eager, mixed/prefill)
and a torch-profiler table of one decode step at a given batch size and of one prefill step.

    python benchmarks/step_profile.py --model-dir DIR [--batch 256] [--requests 256] [--quant-policy 8]
Prints JSON lines (summary per step kind) to stdout and the profiler tables to stderr.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from common import device_name, emit, log
from throughput import workload

from lmforge import GenerationConfig, PytorchEngineConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--max-prefill-token-num", type=int, default=8192)
    p.add_argument("--quant-policy", type=int, choices=[0, 4, 8], default=0, help="KV cache int8 (8) / int4 (4)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto", help="fp8: a float8 e4m3 KV cache")
    args = p.parse_args()
    from lmforge.engine.engine import Engine

    engine = Engine(
        args.model_dir,
        PytorchEngineConfig(
            dtype="bfloat16",
            max_prefill_token_num=args.max_prefill_token_num,
            quant_policy=args.quant_policy,
            kv_cache_dtype=args.kv_cache_dtype,
        ),
    )
    gen = lambda n: GenerationConfig(
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=True,
        temperature=0.6,  # noqa: E731
        ignore_eos=True,
    )
    reqs = workload(args.requests, 0)
    for ids, n in reqs:
        engine.add_request(ids, gen(n))
    stats = collections.defaultdict(list)
    sched_fn = engine.scheduler.schedule
    last = {}

    def spy():
        out = sched_fn()
        last["kind"] = ("decode" if out.is_decoding else "mixed") + f"/{min(len(out.seqs) // 32 * 32, 256)}"
        last["tokens"] = sum(out.num_tokens)
        return out

    engine.scheduler.schedule = spy
    t_all = time.perf_counter()
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        stats[last.get("kind", "idle")].append((time.perf_counter() - t0, last.get("tokens", 0)))
    wall = time.perf_counter() - t_all
    for kind, rows in sorted(stats.items()):
        times = [r[0] for r in rows]
        emit(
            device=device_name("cuda"),
            kind=kind,
            quant_policy=args.quant_policy,
            kv_cache_dtype=args.kv_cache_dtype,
            steps=len(rows),
            total_s=round(sum(times), 3),
            median_ms=round(statistics.median(times) * 1e3, 3),
            tokens=sum(r[1] for r in rows),
        )
    emit(device=device_name("cuda"), kind="all", wall_s=round(wall, 3))
    engine.scheduler.schedule = sched_fn

    # one decode step at --batch, and one prefill step, under the profiler
    for ids, _ in reqs[: args.batch]:
        engine.add_request(ids, gen(64))
    while engine.scheduler.waiting or any(s.num_pending_tokens > 1 for s in engine.scheduler.running):
        engine.step()
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
    log(
        f"decode steps at batch {len(engine.scheduler.running)}:\n"
        + prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    )
    log(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    while engine.has_unfinished():
        engine.step()
    engine.add_request(reqs[0][0], GenerationConfig(max_new_tokens=64, ignore_eos=True))
    for _ in range(8):
        engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        engine.step()
    torch.cuda.synchronize()
    emit(device=device_name("cuda"), kind="bs1_decode_step", ms=round((time.perf_counter() - t0) / 20 * 1e3, 3))
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
    log("batch-1 decode steps:\n" + prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
    while engine.has_unfinished():
        engine.step()
    for ids, _ in reqs[:16]:
        engine.add_request(ids, gen(1))
    torch.cuda.synchronize()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        engine.step()
        torch.cuda.synchronize()
    log("prefill step:\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))


if __name__ == "__main__":
    main()
