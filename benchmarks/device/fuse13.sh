#!/usr/bin/env bash
# fuse13 device round: batch-1 decode profile (kernel table per step, eager and graph), bs1 tok/s, M=1 GEMM timing,
# llama-1b then llama-8b; then the GPU tests of the kernels this branch touches
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/lmf-triton-fuse13
S=$(date +%s)
left() { echo $(( ${BUDGET:-88} - ($(date +%s) - S) )); }
nvidia-smi --query-gpu=name,clocks.max.mem,clocks.max.sm --format=csv > $OUT/gpu.txt 2>&1
ls /tmp/lmf-models/*/config.json >> $OUT/gpu.txt 2>&1
M1=/tmp/lmf-models/llama-1b; M8=/tmp/lmf-models/llama-8b
timeout 36 python3 benchmarks/decode_profile.py --model llama-1b --model-dir $M1 --gemv > $OUT/prof_1b.jsonl 2> $OUT/prof_1b.log
echo "1b rc=$? at $(( $(date +%s) - S )) s" >> $OUT/steps.txt
timeout 8 python3 benchmarks/decode_profile.py --model llama-8b --model-dir $M8 --gemv --no-engine > $OUT/gemv_8b.jsonl 2> $OUT/gemv_8b.log
echo "8b gemv rc=$? at $(( $(date +%s) - S )) s" >> $OUT/steps.txt
if [ -f $M8/config.json ] || [ "$(left)" -gt 70 ]; then
  timeout $(( $(left) - 2 )) python3 benchmarks/decode_profile.py --model llama-8b --model-dir $M8 > $OUT/prof_8b.jsonl 2> $OUT/prof_8b.log
  echo "8b rc=$? at $(( $(date +%s) - S )) s" >> $OUT/steps.txt
fi
cat $OUT/steps.txt; cat $OUT/*.jsonl | cut -c1-300
