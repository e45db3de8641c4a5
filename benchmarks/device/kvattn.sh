#!/usr/bin/env bash
# kvattn device round: llama-1b throughput int8 KV vs bf16 KV (the goal), then decode/prefill kernel times of this
# tree ("new") beside copies of older kernels (benchmarks/device/kvattn_<name>: base = main's), GPU tests of the
# quantized-KV kernels during the compile phase
cd "$(dirname "$0")/../.."; export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/lmforge/triton  # the engine's default: shared with the runs
mkdir -p $TRITON_CACHE_DIR
S=$(date +%s); t() { echo "$1 $(( $(date +%s) - S )) s" >> $OUT/times.txt; }
M=/tmp/lmf-models/llama-1b
B="python3 benchmarks/kv_quant_attention.py --prefill --sweep --batches 256 --kv-lens 2048 --rep 8 --only-quant-impls"
ls -d benchmarks/device/kvattn_*/ >/dev/null 2>&1 && B="$B --compare benchmarks/device"
for i in 0 1 2 3 4 5 6 7 8 9 10 11; do timeout 17 $B --compile-only --shard $i/12 > $OUT/compile_$i.log 2>&1 & done
timeout 17 python3 -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_kv_cache_quant_kernels.py \
  -k "(attention_over and bfloat16) or offset or replay or window" > $OUT/tests.log 2>&1 &
wait; t compile
TP="python3 benchmarks/throughput.py --model llama-1b --model-dir $M --skip bs1"
timeout 25 $TP --quant-policy 8 > $OUT/thr_q8.jsonl 2> $OUT/thr_q8.err; t q8
timeout 22 $TP --quant-policy 0 > $OUT/thr_q0.jsonl 2> $OUT/thr_q0.err; t q0
timeout 11 $B --deadline 8 > $OUT/kernels.jsonl 2> $OUT/kernels.err; t kernels
tail -3 $OUT/tests.log; cut -c1-400 $OUT/thr_*.jsonl
