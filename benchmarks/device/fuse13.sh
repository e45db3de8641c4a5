#!/usr/bin/env bash
# fuse13 device round: batch-1 decode profile (kernel table per step, eager and graph), bs1 tok/s, M=1 GEMM timing,
# the switchable fusions off (--baseline) and on; then the GPU tests of the new kernels while time is left
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/lmf-triton-fuse13
S=$(date +%s)
left() { echo $(( ${BUDGET:-88} - ($(date +%s) - S) )); }
mark() { echo "$1 rc=$2 at $(( $(date +%s) - S )) s" >> $OUT/steps.txt; }
nvidia-smi --query-gpu=name,clocks.max.mem,clocks.max.sm --format=csv > $OUT/gpu.txt 2>&1
ls /tmp/lmf-models/*/config.json >> $OUT/gpu.txt 2>&1
M1=/tmp/lmf-models/llama-1b; M8=/tmp/lmf-models/llama-8b
P="python3 benchmarks/decode_profile.py"
timeout 20 $P --model llama-1b --model-dir $M1 --gemv --gemv-models llama-1b,llama-8b --no-engine > $OUT/gemv.jsonl 2> $OUT/gemv.log; mark gemv $?
timeout 32 $P --model llama-1b --model-dir $M1 --baseline > $OUT/prof_1b_base.jsonl 2> $OUT/prof_1b_base.log; mark prof1b_base $?
timeout $(( $(left) - 1 )) $P --model llama-1b --model-dir $M1 > $OUT/prof_1b.jsonl 2> $OUT/prof_1b.log; mark prof1b $?
if [ "$(left)" -gt 8 ]; then
  timeout $(( $(left) - 1 )) python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_attention_kernels.py \
    -k "fused_fill and (gqa4 and 128 or window) or counters or fill_kv_and_attend" > $OUT/tests.log 2>&1; mark tests $?
fi
cat $OUT/steps.txt; cat $OUT/*.jsonl | cut -c1-400
