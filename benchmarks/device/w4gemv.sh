#!/usr/bin/env bash
# w4gemv device round: int4 decode-kernel candidates (JSON lines with GB/s), then (later rounds) the e2e bs1 figure
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/lmf-triton-w4
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv > $OUT/gpu.txt 2>&1
timeout 22 python3 benchmarks/w4gemv_bench.py --m 1 --cands gemv,tinygemm,wna16 > $OUT/bench_m1.jsonl 2> $OUT/bench_m1.err
timeout 18 python3 benchmarks/w4gemv_bench.py --gemv-sweep --proj gate_up_proj,o_proj > $OUT/sweep.jsonl 2> $OUT/sweep.err
timeout 14 python3 benchmarks/w4gemv_bench.py --m 2,4,16 --cands tinygemm,wna16 --proj gate_up_proj,down_proj > $OUT/bench_m16.jsonl 2> $OUT/bench_m16.err
tail -3 $OUT/*.err; cut -c1-330 $OUT/*.jsonl
