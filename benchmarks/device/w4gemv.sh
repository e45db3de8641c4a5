#!/usr/bin/env bash
# w4gemv device round: int4 decode-kernel candidates (JSON lines with GB/s, most important first)
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/lmf-triton-w4
B=${BUDGET:-37}
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv > $OUT/gpu.txt 2>&1
timeout $((B - 2)) python3 benchmarks/w4gemv_bench.py --m 1 --cands gemv,tinygemm,wna16 --then small,sweep > $OUT/bench.jsonl 2> $OUT/bench.err
tail -3 $OUT/bench.err; cut -c1-330 $OUT/bench.jsonl
