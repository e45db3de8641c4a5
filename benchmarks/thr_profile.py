"""Where the throughput run's time goes, on the GPU and on the host: the peer-kit workload (as throughput.py) with
CUDA events around every step, then (optionally) a second pass under torch.profiler over a few windows of steps.

Pass 1 (clean timing, ~10 us of events per step): per step the GPU span of its launch (first to last queued op),
the GPU idle gap before it (from the previous step's last op to this step's first), and the host phases (schedule,
launch, the sync wait and the host work of reading outputs). Summaries by step kind (mixed = prefill chunks, decode)
and batch-size band, one JSON line each.

Pass 2: the same workload again with the profiler on for the listed step windows (kernel tables by CUDA time, the
GPU busy fraction from the kernels' union, a gzipped chrome trace per window), aborted after the last window.

    python benchmarks/thr_profile.py --model-dir DIR [--windows 4:6,100:104,600:604] [--budget-s 80] [--out DIR]

--bs1: throughput.py's batch-1 measure instead (128 ids in, 256 greedy tokens out, after one untimed run; graphs up
to --max-batch-size): pass 1's per-step GPU span / idle gap / host phases, then one profiled window of decode steps.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import statistics
import time

import torch
from common import device_name, emit, log
from throughput import workload

from lmforge import GenerationConfig, PytorchEngineConfig


def sampled(n: int) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=0.6, top_p=1.0, top_k=0, ignore_eos=True
    )


class StepTimer:
    """Wraps an engine's schedule / _launch / _process to time every step on host and device."""

    def __init__(self, engine):
        self.engine = engine
        self.steps: list[dict] = []
        self.proc: list[tuple[float, float, int]] = []  # (sync wait s, host work s, outputs)
        self.sched_s: list[float] = []
        self._orig = (engine.scheduler.schedule, engine._launch, engine._process)
        self.annotate = False
        self.tag = None  # stored with each step

    def install(self):
        eng = self.engine
        sched_fn, launch_fn, process_fn = self._orig

        def schedule():
            t0 = time.perf_counter()
            out = sched_fn()
            self.sched_s.append(time.perf_counter() - t0)
            return out

        def launch(sched, outputs):
            e0 = torch.cuda.Event(enable_timing=True)
            e0.record()
            h0 = time.perf_counter()
            if self.annotate:
                with torch.profiler.record_function("lmf_launch"):
                    r = launch_fn(sched, outputs)
            else:
                r = launch_fn(sched, outputs)
            h1 = time.perf_counter()
            e1 = torch.cuda.Event(enable_timing=True)
            e1.record()
            n_tok = sum(sched.num_tokens)
            self.steps.append(
                dict(
                    e0=e0,
                    e1=e1,
                    h0=h0,
                    launch_s=h1 - h0,
                    seqs=len(sched.seqs),
                    tokens=n_tok,
                    decode=bool(sched.seqs) and n_tok == len(sched.seqs),
                    kv=sum(s.num_computed_tokens for s in sched.seqs),
                    running=len(eng.scheduler.running),
                    waiting=len(eng.scheduler.waiting),
                    free_blocks=eng.block_manager.num_free_blocks,
                    tag=self.tag,
                )
            )
            return r

        def process(step):
            t0 = time.perf_counter()
            if step.ready is not None:
                step.ready.synchronize()
            t1 = time.perf_counter()
            if self.annotate:
                with torch.profiler.record_function("lmf_process"):
                    out = process_fn(step)
            else:
                out = process_fn(step)
            self.proc.append((t1 - t0, time.perf_counter() - t1, len(out)))
            return out

        eng.scheduler.schedule, eng._launch, eng._process = schedule, launch, process

    def uninstall(self):
        eng = self.engine
        eng.scheduler.schedule, eng._launch, eng._process = self._orig

    def summary(self) -> dict:
        torch.cuda.synchronize()
        rows = []
        prev = None
        for s in self.steps:
            span = s["e0"].elapsed_time(s["e1"]) / 1e3
            gap = prev["e1"].elapsed_time(s["e0"]) / 1e3 if prev is not None else 0.0
            rows.append(dict(s, span=span, gap=max(gap, 0.0)))
            prev = s
        return rows


def band(r: dict) -> str:
    if not r["decode"]:
        return "mixed"
    b = r["seqs"]
    return "decode/" + ("1-31" if b < 32 else "32-127" if b < 128 else "128-223" if b < 224 else "224-256")


def report_pass1(rows: list[dict], timer: StepTimer, wall: float, n_out: int, dev: str) -> None:
    groups = collections.defaultdict(list)
    for r in rows:
        groups[band(r)].append(r)
    total_span = sum(r["span"] for r in rows)
    total_gap = sum(r["gap"] for r in rows)
    wait = sum(p[0] for p in timer.proc)
    work = sum(p[1] for p in timer.proc)
    emit(
        device=dev,
        measure="thr_pass1",
        wall_s=round(wall, 3),
        out_tok_s=round(n_out / wall, 1),
        steps=len(rows),
        gpu_span_s=round(total_span, 3),
        gpu_gap_s=round(total_gap, 3),
        host_schedule_s=round(sum(timer.sched_s), 3),
        host_launch_s=round(sum(r["launch_s"] for r in rows), 3),
        host_sync_wait_s=round(wait, 3),
        host_process_work_s=round(work, 3),
        max_batch=max(r["seqs"] for r in rows),
        min_free_blocks=min(r["free_blocks"] for r in rows),
        preemptions=timer.engine.scheduler.num_preemptions,
        kv_blocks=timer.engine.block_manager.num_blocks,
        host=timer.engine.step_stats,
    )
    for name, g in sorted(groups.items()):
        spans = [r["span"] for r in g]
        emit(
            device=dev,
            measure="thr_band",
            band=name,
            steps=len(g),
            span_s=round(sum(spans), 3),
            gap_s=round(sum(r["gap"] for r in g), 3),
            span_ms_median=round(statistics.median(spans) * 1e3, 3),
            launch_ms_median=round(statistics.median(r["launch_s"] for r in g) * 1e3, 3),
            tokens=sum(r["tokens"] for r in g),
            mean_seqs=round(statistics.mean(r["seqs"] for r in g), 1),
            mean_kv_per_seq=round(statistics.mean(r["kv"] / max(r["seqs"], 1) for r in g), 1),
        )
    # the first 40 steps one by one (the prefill phase), then every 50th
    for i, r in enumerate(rows):
        if i < 40 or i % 50 == 0:
            emit(
                measure="thr_step",
                i=i,
                seqs=r["seqs"],
                tokens=r["tokens"],
                kv=r["kv"],
                running=r["running"],
                waiting=r["waiting"],
                free_blocks=r["free_blocks"],
                span_ms=round(r["span"] * 1e3, 3),
                gap_ms=round(r["gap"] * 1e3, 3),
                launch_ms=round(r["launch_s"] * 1e3, 3),
                t_host=round(r["h0"] - rows[0]["h0"], 4),
            )
    p = timer.proc
    emit(
        measure="thr_process",
        calls=len(p),
        wait_ms_median=round(statistics.median(x[0] for x in p) * 1e3, 3),
        work_ms_median=round(statistics.median(x[1] for x in p) * 1e3, 3),
        work_ms_p90=round(sorted(x[1] for x in p)[int(len(p) * 0.9)] * 1e3, 3),
        schedule_ms_median=round(statistics.median(timer.sched_s) * 1e3, 3),
    )


def trace_busy(path: str) -> dict:
    with open(path) as f:
        trace = json.load(f)
    gpu = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in trace["traceEvents"]
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    )
    if not gpu:
        return {}
    busy, cur_s, cur_e, gaps = 0.0, gpu[0][0], gpu[0][1], []
    for s, e in gpu[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append(s - cur_e)
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = gpu[-1][1] - gpu[0][0]
    gaps.sort(reverse=True)
    return dict(
        span_ms=round(span / 1e3, 3),
        busy_ms=round(busy / 1e3, 3),
        busy_frac=round(busy / span, 3),
        gaps_over_50us=sum(1 for g in gaps if g > 50),
        largest_gaps_us=[round(g) for g in gaps[:8]],
        kernels=len(gpu),
    )


def pass2(engine, reqs, windows: list[tuple[int, int]], out_dir: str, deadline: float, dev: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    timer = StepTimer(engine)
    timer.annotate = True
    timer.install()
    ids = [engine.add_request(p, sampled(n)) for p, n in reqs]
    step = 0
    last = max(b for _, b in windows)
    from lmforge.backends.cuda import attention as cuda_attention

    min_prefix = cuda_attention.MIN_DECODE_PREFIX
    try:
        while engine.has_unfinished() and step <= last and time.perf_counter() < deadline:
            win = next((w for w in windows if w[0] == step), None)
            if win is None:
                # prefill phase: mixed steps alternate the decode-prefix split on (even) and off (odd)
                mixing = bool(engine.scheduler.waiting)
                cuda_attention.MIN_DECODE_PREFIX = min_prefix if not mixing or step % 2 == 0 else 10**9
                timer.tag = ("split" if step % 2 == 0 else "nosplit") if mixing else None
                engine.step()
                step += 1
                if mixing and not engine.scheduler.waiting:
                    torch.cuda.synchronize()
                    rows = timer.summary()
                    for tag in ("split", "nosplit"):
                        got = [r for r in rows if r["tag"] == tag and not r["decode"]]
                        emit(
                            measure="thr_mixed_ab",
                            tag=tag,
                            span_ms=[round(r["span"] * 1e3, 2) for r in got],
                            seqs=[r["seqs"] for r in got],
                            tokens=[r["tokens"] for r in got],
                        )
                continue
            cuda_attention.MIN_DECODE_PREFIX = min_prefix
            timer.tag = None
            torch.cuda.synchronize()
            n0 = len(timer.steps)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                while step < win[1] and engine.has_unfinished():
                    with torch.profiler.record_function("lmf_step"):
                        engine.step()
                    step += 1
                torch.cuda.synchronize()
            seqs = [s["seqs"] for s in timer.steps[n0:]]
            toks = [s["tokens"] for s in timer.steps[n0:]]
            name = f"win{win[0]}-{win[1]}"
            path = os.path.join(out_dir, f"trace_{name}.json")
            prof.export_chrome_trace(path)
            emit(device=dev, measure="thr_window", window=name, seqs=seqs, tokens=toks, **trace_busy(path))
            with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as g:
                g.write(f.read())
            os.remove(path)
            log(
                f"window {name} seqs={seqs} tokens={toks}\n"
                + prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
            )
            log(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
    finally:
        cuda_attention.MIN_DECODE_PREFIX = min_prefix
        timer.uninstall()
        for rid in ids:
            engine.abort(rid)
        while engine.has_unfinished():
            engine.step()


def main() -> None:
    t_start = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--max-prefill-token-num", type=int, default=8192)
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--windows", default="4:6,100:104,600:604", help="profiled step windows a:b, comma-separated")
    p.add_argument("--budget-s", type=float, default=80.0, help="skip pass 2 / stop it when the script reaches this")
    p.add_argument("--out", default=".", help="folder for the traces")
    p.add_argument("--bs1", action="store_true", help="the batch-1 greedy decode instead of the 256-request workload")
    p.add_argument("--cprofile", action="store_true", help="--bs1: also a cProfile of a batch-1 run (host functions)")
    args = p.parse_args()
    from lmforge.engine.engine import Engine

    engine = Engine(
        args.model_dir,
        PytorchEngineConfig(
            dtype="bfloat16",
            cache_max_entry_count=0.8,
            max_prefill_token_num=args.max_prefill_token_num,
            max_batch_size=args.max_batch_size,
        ),
    )
    dev = device_name("cuda")
    emit(
        device=dev,
        measure="thr_engine",
        load_s=round(engine.load_seconds, 2),
        load_breakdown=engine.load_breakdown,
        kv_blocks=engine.block_manager.num_blocks,
        block_size=engine.engine_config.block_size,
        max_batch_size=engine.max_batch_size,
        session_len=engine.session_len,
        tokenizer=engine.tokenizer is not None,
        graphs=sorted(engine.graph_runner.graphs) if engine.graph_runner else None,
    )
    if args.bs1:
        bs1(engine, args, dev, t_start)
        return
    reqs = workload(args.requests, 0)
    # warm-up as throughput.py
    import random

    warm = random.Random(123)
    warm_reqs = [([warm.randint(10, 49151) for _ in range(64)], 16 + 4 * i) for i in range(16)]
    for ids, n in warm_reqs:
        engine.add_request(ids, sampled(n))
    while engine.has_unfinished():
        engine.step()

    timed_pass(engine, [(ids, sampled(n)) for ids, n in reqs], dev)
    windows = [tuple(int(x) for x in w.split(":")) for w in args.windows.split(",") if w]
    if windows and time.perf_counter() - t_start < args.budget_s - 8:
        pass2(engine, reqs, windows, args.out, t_start + args.budget_s, dev)
    else:
        log("pass 2 skipped: no time left")


def timed_pass(engine, reqs: list, dev: str) -> list[dict]:
    """Pass 1: the (prompt ids, GenerationConfig) requests submitted at once and run to the end under the step timer;
    prints its summary lines and returns the per-step rows."""
    engine.step_stats = dict.fromkeys(engine.step_stats, 0)
    timer = StepTimer(engine)
    timer.install()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for ids, gen in reqs:
        engine.add_request(ids, gen)
    n_out = 0
    while engine.has_unfinished():
        for out in engine.step():
            n_out += len(out.token_ids)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    timer.uninstall()
    rows = timer.summary()
    report_pass1(rows, timer, wall, n_out, dev)
    return rows


def bs1(engine, args, dev: str, t_start: float) -> None:
    """Batch-1 greedy decode (throughput.py's bs1 measure) under the step timer, then a profiled window."""
    from throughput import bs1_ids

    greedy = GenerationConfig(max_new_tokens=256, min_new_tokens=256, top_k=1, ignore_eos=True)
    ids = bs1_ids(0)
    engine.add_request(ids, greedy)
    while engine.has_unfinished():
        engine.step()
    rows = timed_pass(engine, [(ids, greedy)], dev)
    dec = [r for r in rows if r["decode"]][8:-8]
    pairs = zip(dec, dec[1:], strict=False)
    emit(
        device=dev,
        measure="bs1_steps",
        steps=len(dec),
        span_us_median=round(statistics.median(r["span"] for r in dec) * 1e6, 1),
        gap_us_median=round(statistics.median(r["gap"] for r in dec) * 1e6, 1),
        gap_us_p90=round(sorted(r["gap"] for r in dec)[int(len(dec) * 0.9)] * 1e6, 1),
        launch_us_median=round(statistics.median(r["launch_s"] for r in dec) * 1e6, 1),
        host_step_us_median=round(statistics.median(b["h0"] - a["h0"] for a, b in pairs) * 1e6, 1),
    )
    if args.cprofile:
        import cProfile
        import io
        import pstats

        engine.add_request(ids, greedy)
        with cProfile.Profile() as prof:
            while engine.has_unfinished():
                engine.step()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(45)
        log("cProfile of a batch-1 run (256 steps), by own time:\n" + text.getvalue())
    if time.perf_counter() - t_start > args.budget_s - 8:
        return
    from torch.profiler import ProfilerActivity, profile

    engine.add_request(ids, greedy)
    for _ in range(40):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(8):
            with torch.profiler.record_function("lmf_step"):
                engine.step()
        torch.cuda.synchronize()
    path = os.path.join(args.out, "trace_bs1.json")
    prof.export_chrome_trace(path)
    emit(device=dev, measure="bs1_window", **trace_busy(path))
    with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as g:
        g.write(f.read())
    os.remove(path)
    log(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
    while engine.has_unfinished():
        engine.step()


if __name__ == "__main__":
    main()
