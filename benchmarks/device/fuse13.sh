#!/usr/bin/env bash
# fuse13 device round: batch-1 decode of llama-1b and llama-8b with this branch's fusions (bs1 tok/s as throughput.py
# measures it, a per-kernel table per step, eager and graph, the graph's GPU time, host time per step); the GPU tests
# of the new kernels, then the engine's graph-vs-eager and HF parity tests, run beside it at low CPU priority
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/lmf-triton-fuse13
S=$(date +%s)
left() { echo $(( ${BUDGET:-77} - ($(date +%s) - S) )); }
mark() { echo "$1 rc=$2 at $(( $(date +%s) - S )) s" >> $OUT/steps.txt; }
nvidia-smi --query-gpu=name,clocks.max.mem,clocks.max.sm --format=csv > $OUT/gpu.txt 2>&1
M1=/tmp/lmf-models/llama-1b; M8=/tmp/lmf-models/llama-8b
T="nice -n 19 python3 -m pytest -q -p no:cacheprovider -rf"
( export TRITON_CACHE_DIR=/tmp/lmf-triton-fuse13-tests
  timeout $(( $(left) - 2 )) $T tests/kernels/test_decode_cuda_graph.py tests/kernels/test_argmax_kernel.py \
    tests/kernels/test_attention_kernels.py tests/kernels/test_pointwise_kernels.py tests/kernels/test_gemv_kernel.py \
    -k "graph or argmax or cos_sin or counters or fill_kv_and_attend or fused or split_counts or gemv or test_decode_attention" \
    > $OUT/tests_kernels.log 2>&1; mark tests_kernels $?
  timeout $(( $(left) - 2 )) $T tests/engine/test_gpu_engine.py tests/engine/test_sampler.py \
    "tests/models/test_gpu_parity.py::test_bf16_cuda_parity[llama-batch]" > $OUT/tests_engine.log 2>&1; mark tests_engine $?
) &
TP=$!
timeout $(( $(left) - 2 )) python3 benchmarks/decode_profile.py --model llama-1b,llama-8b,llama-1b:base --model-dir $M1,$M8,$M1 \
  > $OUT/prof.jsonl 2> $OUT/prof.log; mark prof $?
wait $TP
cat $OUT/steps.txt; cut -c1-400 $OUT/prof.jsonl; tail -4 $OUT/tests_kernels.log $OUT/tests_engine.log
