#!/usr/bin/env bash
# fuse13 device round: batch-1 decode of llama-1b and llama-8b with this branch's fusions (bs1 tok/s as throughput.py
# measures it, a per-kernel table per step, eager and graph, the graph's GPU time, host time per step), llama-1b with
# them off (main's kernels), then the GPU tests of the new kernels and the engine's graph-vs-eager and parity tests
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/lmf-triton-fuse13
S=$(date +%s)
left() { echo $(( ${BUDGET:-77} - ($(date +%s) - S) )); }
limit() { local t=$(( $(left) - 2 )); [ "$t" -gt 1 ] && echo "$t" || echo 1; }
mark() { echo "$1 rc=$2 at $(( $(date +%s) - S )) s" >> $OUT/steps.txt; }
nvidia-smi --query-gpu=name,clocks.max.mem,clocks.max.sm --format=csv > $OUT/gpu.txt 2>&1
M1=/tmp/lmf-models/llama-1b; M8=/tmp/lmf-models/llama-8b
timeout $(limit) python3 benchmarks/decode_profile.py --model llama-1b,llama-8b,llama-1b:base --model-dir $M1,$M8,$M1 \
  > $OUT/prof.jsonl 2> $OUT/prof.log; mark prof $?
T="python3 -m pytest -q -p no:cacheprovider -rf"
timeout $(limit) $T tests/kernels/test_decode_cuda_graph.py tests/kernels/test_argmax_kernel.py \
  tests/kernels/test_attention_kernels.py tests/kernels/test_pointwise_kernels.py tests/kernels/test_gemv_kernel.py \
  > $OUT/tests_kernels.log 2>&1; mark tests_kernels $?
timeout $(limit) $T tests/engine/test_gpu_engine.py tests/engine/test_sampler.py tests/models/test_gpu_parity.py \
  > $OUT/tests_engine.log 2>&1; mark tests_engine $?
cat $OUT/steps.txt; cut -c1-400 $OUT/prof.jsonl; tail -4 $OUT/tests_kernels.log $OUT/tests_engine.log
