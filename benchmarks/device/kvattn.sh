#!/usr/bin/env bash
# kvattn device round: quantized-KV attention kernels (new vs the kvattn_base copy), their GPU tests
cd "$(dirname "$0")/../.."; export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=/tmp/kvattn-triton
S=$(date +%s)
B="python3 benchmarks/kv_quant_attention.py --sweep --prefill --rep 10"
[ -d benchmarks/device/kvattn_base ] && B="$B --compare benchmarks/device"
for i in 0 1 2 3 4 5 6 7 8 9; do timeout 15 $B --compile-only --shard $i/10 > $OUT/compile_$i.log 2>&1 & done
timeout 15 python3 -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_kv_cache_quant_kernels.py \
  -k "(attention_over and bfloat16 and 64-128) or offset" > $OUT/tests.log 2>&1 &
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/gpu.txt 2>&1
wait
echo "compile phase $(( $(date +%s) - S )) s" > $OUT/times.txt
timeout 22 $B --deadline 18 > $OUT/kernels.jsonl 2> $OUT/kernels.err
echo "total $(( $(date +%s) - S )) s" >> $OUT/times.txt
tail -3 $OUT/tests.log
