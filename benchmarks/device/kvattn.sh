#!/usr/bin/env bash
# kvattn device script: GPU tests of the quantized-KV kernels first, then decode/prefill kernel times over bf16, int8,
# int4 and fp8 caches (vs_bf16 in each JSON line), then llama-1b throughput int8 KV vs bf16 KV. $BUDGET: seconds.
cd "$(dirname "$0")/../.."; export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/lmforge/triton  # the engine's default: shared with the runs
mkdir -p $TRITON_CACHE_DIR
S=$(date +%s); t() { echo "$1 $(( $(date +%s) - S )) s" >> $OUT/times.txt; }
M=/tmp/lmf-models/llama-1b
B="python3 benchmarks/kv_quant_attention.py --prefill --batches 256,64 --kv-lens 2048,512 --rep 8"
timeout 120 python3 -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_kv_cache_quant_kernels.py \
  tests/engine/test_gpu_kv_cache_quant.py > $OUT/tests.log 2>&1; t tests
for i in 0 1 2 3 4 5 6 7; do timeout 30 $B --compile-only --shard $i/8 > $OUT/compile_$i.log 2>&1 & done; wait; t compile
timeout 40 $B --deadline 35 > $OUT/kernels.jsonl 2> $OUT/kernels.err; t kernels
TP="python3 benchmarks/throughput.py --model llama-1b --model-dir $M --skip bs1"
timeout 60 $TP --quant-policy 8 > $OUT/thr_q8.jsonl 2> $OUT/thr_q8.err; t q8
timeout 60 $TP --quant-policy 0 > $OUT/thr_q0.jsonl 2> $OUT/thr_q0.err; t q0
tail -3 $OUT/tests.log; cut -c1-400 $OUT/thr_*.jsonl
