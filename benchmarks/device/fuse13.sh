#!/usr/bin/env bash
# fuse13 device round: batch-1 decode profile (kernel table per step, eager and graph), bs1 tok/s, M=1 GEMM timing,
# llama-1b then llama-8b
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/lmf-triton-fuse13
S=$(date +%s)
left() { echo $(( ${BUDGET:-88} - ($(date +%s) - S) )); }
mark() { echo "$1 rc=$2 at $(( $(date +%s) - S )) s" >> $OUT/steps.txt; }
nvidia-smi --query-gpu=name,clocks.max.mem,clocks.max.sm --format=csv > $OUT/gpu.txt 2>&1
ls /tmp/lmf-models/*/config.json >> $OUT/gpu.txt 2>&1
M1=/tmp/lmf-models/llama-1b; M8=/tmp/lmf-models/llama-8b
P="python3 benchmarks/decode_profile.py"
timeout 14 $P --model llama-1b --model-dir $M1 --gemv --no-engine > $OUT/gemv_1b.jsonl 2> $OUT/gemv_1b.log; mark gemv1b $?
timeout 36 $P --model llama-1b --model-dir $M1 > $OUT/prof_1b.jsonl 2> $OUT/prof_1b.log; mark prof1b $?
timeout 12 $P --model llama-8b --model-dir $M8 --gemv --no-engine > $OUT/gemv_8b.jsonl 2> $OUT/gemv_8b.log; mark gemv8b $?
if [ -f $M8/config.json ] && [ "$(left)" -gt 35 ]; then
  timeout $(( $(left) - 1 )) $P --model llama-8b --model-dir $M8 > $OUT/prof_8b.jsonl 2> $OUT/prof_8b.log; mark prof8b $?
elif [ "$(left)" -gt 25 ]; then
  timeout $(( $(left) - 1 )) $P --model llama-1b --model-dir $M1 --no-gemv > $OUT/prof_1b_cublas.jsonl 2> $OUT/prof_1b_cublas.log; mark prof1b_cublas $?
fi
cat $OUT/steps.txt; cat $OUT/*.jsonl | cut -c1-400
